"""meshd's resolver for mesh names (issue 17).

- :mod:`meshd.dns.zone`: the records (peers, this node, admin records) and the sans-IO answer function;
- :mod:`meshd.dns.wire`: that answer with dnspython, imported on the first query or after start-up;
- :mod:`meshd.dns.server`: the thin asyncio UDP + TCP shell on the resolver address;
- :mod:`meshd.dns.system`: how the host is told about it (systemd-resolved split DNS, or the hosts block).

The resolver listens on :data:`RESOLVER_IPV4`, an address put on the mesh interface. It is
100.100.100.100, as Tailscale's: inside the default overlay prefix 100.64.0.0/10 (RFC 6598 shared address
space, so it clashes with no LAN), which is why the coordinator's address pool never hands it out
(coordinator/ipam.py). Peers cannot reach it: their WireGuard allowed IPs for us hold only our own
certificate's addresses, so a packet from a peer to it is dropped by WireGuard; only this host asks it.
This module imports nothing heavy: the coordinator reads the constant.
"""

from __future__ import annotations

RESOLVER_IPV4 = "100.100.100.100"
DNS_PORT = 53
DNS_MODES = ("auto", "resolved", "hosts", "off")
