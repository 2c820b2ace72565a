"""meshd's relay client: connections to relay regions and the per-peer local UDP proxies (DESIGN.md §1)."""
