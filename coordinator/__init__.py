"""coordinator: the signalling server of the mesh VPN."""
