"""NAT traversal: STUN on the WireGuard port, port maps, probes."""
