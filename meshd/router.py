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
from urllib.parse import urlsplit

from meshd import exitnode, forwarding, localnet, routing
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
        exit_node: str | None = None,
        local_networks: Callable[[], Mapping[str, localnet.Network]] | None = None,
    ) -> None:
        self.interface = interface
        self.advertised = advertise + (routing.EXIT_PREFIXES if advertise_exit else ())
        self.forwarding = forwarding.Forwarding(interface, snat)
        self.approved: tuple[str, ...] = ()  #: what the map says we carry
        self.exit_node = exit_node  #: the chosen exit node's name (meshd/exitnode.py)
        self.control_url = ""  #: the coordinator: its address stays off the exit node's path
        self._relay_urls: tuple[str, ...] = ()
        self._exit_installed: tuple[bool, tuple[str, ...]] | None = None  #: (ipv6, kept addresses)
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
        self._relay_urls = tuple(r.url for r in m.relays)
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
        if exit_node is None and self.exit_node is not None:
            exit_node = next((p.node_id for p in peers if p.name == self.exit_node), None)
        return routing.chosen_routes(carriers, own, exit_node)

    @property
    def fwmark(self) -> int:
        """WireGuard's fwmark: its own packets never take the exit node's table (0: none)."""
        return exitnode.TABLE if self.exit_node is not None else 0

    async def settle(self, routed: dict[int, tuple[str, ...]]) -> None:
        """After WireGuard took `routed`: policy routing on when an exit node carries our default routes."""
        exits = next((ps for ps in routed.values() if any(routing.is_exit(p) for p in ps)), ())
        if not exits:
            if self._exit_installed is not None:
                await exitnode.clear()
                self._exit_installed = None
                log.info("exit node: none, own uplink again")
            return
        want = ("::/0" in exits, await self._keep())
        if want != self._exit_installed:
            await exitnode.install(self.interface, want[1], want[0])
            self._exit_installed = want

    async def _keep(self) -> tuple[str, ...]:
        """The coordinator's and relays' addresses (they stay on the normal path)."""
        out: list[str] = []
        for url in (*self.control_url.split(","), *self._relay_urls):  # several: replicas (issue 16)
            host = urlsplit(url).hostname or ""
            if not host:
                continue
            try:
                out.append(str(ipaddress.ip_address(host)))
            except ValueError:
                try:
                    infos = await asyncio.get_running_loop().getaddrinfo(host, None)
                except OSError:
                    continue
                out.extend(str(i[4][0]) for i in infos)
        return tuple(sorted(set(out)))

    async def close(self) -> None:
        if self._exit_installed is not None:
            await exitnode.clear()
            self._exit_installed = None
        await asyncio.to_thread(self.forwarding.close)
