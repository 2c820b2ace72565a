"""Sans-IO wire formats shared by meshd and the coordinator (no sockets, no clock, no asyncio)."""
