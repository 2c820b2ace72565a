"""meshd: the per-host daemon of the mesh VPN."""
