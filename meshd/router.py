"""Subnet routes and exit nodes in the daemon (issue 17): advertise, forward, and route through peers.

- Advertising: the prefixes of ``--advertise-routes`` (and 0.0.0.0/0, ::/0 for ``--advertise-exit-node``)
  go to the coordinator at every start (``PUT /api/v1/routes``, retried until it answers); the admin
  approves them there. The approved ones come back in our own map entry (``self.routes``).
- Forwarding: while we carry approved routes, meshd.forwarding switches IP forwarding on and masquerades.
- Using peers' routes: meshd.routing picks, per prefix, the peer to route it through; the prefix goes into
  that peer's WireGuard AllowedIPs (and so gets a route on the mesh interface). A prefix that overlaps
  one of our own LANs is never taken: the LAN's route stays (it would be replaced by the mesh route).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Mapping

from meshd import forwarding, localnet, routing
from meshd.control import ControlClient, ControlError
from meshd.firewall import FirewallError
from meshd.proto import netmap

log = logging.getLogger("meshd.router")

RETRY = 2.0  #: seconds between attempts to tell the coordinator our routes


class RouteService:
    def __init__(
        self,
        interface: str,
        advertise: tuple[str, ...] = (),
        advertise_exit: bool = False,
        snat: bool = True,
        local_networks: Callable[[], Mapping[str, localnet.Network]] | None = None,
    ) -> None:
        self.interface = interface
        self.advertised = advertise + (routing.EXIT_PREFIXES if advertise_exit else ())
        self.forwarding = forwarding.Forwarding(interface, snat)
        self.approved: tuple[str, ...] = ()  #: what the map says we carry
        self.exit_node: str | None = None  #: the chosen exit node's name (meshd/exitnode.py)
        self._local = local_networks or (lambda: localnet.local_networks(interface))
        self.error: str | None = None

    async def advertise_loop(self, client: ControlClient) -> None:
        """Tell the coordinator what we offer (also an empty list: withdraws what we offered before)."""
        while True:
            try:
                await client.advertise_routes(list(self.advertised))
                if self.advertised:
                    log.info("advertised routes: %s", ", ".join(self.advertised))
                return
            except ControlError as e:
                log.warning("cannot advertise routes yet: %s", e)
            await asyncio.sleep(RETRY)

    async def on_map(self, m: netmap.NetMap) -> None:
        """Our approved routes changed: forwarding and masquerading follow (before peers use them)."""
        approved = tuple(p for p in m.self_node.routes if p in self.advertised)
        self.approved = approved
        try:
            await asyncio.to_thread(self.forwarding.update, approved)
            self.error = None
        except FirewallError as e:
            self.error = str(e)
            log.error("routing for peers: %s", e)

    async def through(
        self, peers: list[netmap.Peer], exit_node: int | None = None
    ) -> dict[int, tuple[str, ...]]:
        """node id -> prefixes to route through that peer (meshd.routing's choice, minus our LANs)."""
        carriers = {p.node_id: (p.routes, p.online) for p in peers if p.routes}
        if not carriers:
            return {}
        # a netlink dump: pyroute2's synchronous IPRoute runs its own event loop, so not on ours
        lans = list((await asyncio.to_thread(self._local)).values())
        own = list(self.approved)
        for prefixes, _ in carriers.values():
            for prefix in prefixes:
                net = ipaddress.ip_network(prefix)
                if net.prefixlen and any(n.version == net.version and n.overlaps(net) for n in lans):
                    own.append(prefix)
        return routing.chosen_routes(carriers, own, exit_node)

    async def close(self) -> None:
        await asyncio.to_thread(self.forwarding.close)
