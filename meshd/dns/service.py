"""The resolver as one piece of the daemon: its address on the interface, its zone kept in step with the
applied map, the host's DNS configuration (``--dns``), and the undo on stop.

The daemon calls :meth:`MeshDns.attach` before the interface is first configured (the resolver address
goes on it with our own), :meth:`configure` once it exists, runs :meth:`serve` as a supervised task and
calls :meth:`close` on stop, before the interface is removed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from meshd import peerset
from meshd.credentials import Credentials
from meshd.dns import DNS_PORT, RESOLVER_IPV4, system
from meshd.dns import zone as dnszone
from meshd.dns.server import Resolver
from meshd.mapapply import MapApplier
from meshd.proto import netmap

log = logging.getLogger("meshd.dns")


class DnsConfigError(Exception):
    """``--dns resolved`` was asked for and systemd-resolved did not take it."""


class MeshDns:
    def __init__(self, mode: str, interface: str, *, host: str = RESOLVER_IPV4, port: int = DNS_PORT) -> None:
        self.mode = mode  #: as asked: auto | resolved | hosts | off
        self.interface = interface
        self.active = "off" if mode == "off" else "hosts"  #: what is in force: resolved | hosts | off
        self.resolver = Resolver(host, port, dnszone.build("mesh", ()))
        self._creds: Credentials | None = None
        self._registered = False

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def address(self) -> str | None:
        """The resolver's address while it answers (``self.dns`` in ``meshd status``), else None."""
        return self.resolver.address if self.enabled else None

    def attach(self, applier: MapApplier, creds: Credentials) -> None:
        """Put the resolver's address on the interface and keep the zone in step with every map."""
        self._creds = creds
        if not self.enabled:
            applier.write_hosts = False
            return
        applier.extra_addresses = (f"{self.resolver.host}/32",)
        applier.on_names = self._update
        self._update(None, [])

    async def configure(self, applier: MapApplier) -> None:
        """Tell the host: systemd-resolved split DNS, or the hosts block (module docstring of system)."""
        if not self.enabled:
            return
        want = system.effective_mode(self.mode, system.resolved_running())
        if want == "resolved":
            domain = self._creds.enrollment.domain if self._creds is not None else "mesh"
            try:
                await system.register(self.interface, self.resolver.host, domain or "mesh")
            except system.DnsSetupError as e:
                if self.mode == "resolved":
                    raise DnsConfigError(
                        f"systemd-resolved refused the mesh resolver ({e}); "
                        "use --dns hosts where resolved cannot manage the interface"
                    ) from None
                log.warning("systemd-resolved: %s; keeping names in the hosts file", e)
            else:
                self._registered = True
                self.active = "resolved"
                applier.write_hosts = False
                return
        self.active = "hosts"

    async def serve(self) -> None:
        if self.enabled:
            await self.resolver.serve()

    async def close(self) -> None:
        if self._registered:
            self._registered = False
            await system.revert(self.interface)

    def _update(self, m: netmap.NetMap | None, peers: list[peerset.VerifiedPeer]) -> None:
        """A new zone from the map just applied (names and addresses from verified certificates)."""
        creds = self._creds
        if creds is None or creds.state.enrollment is None:
            return
        e = creds.enrollment
        name = m.self_node.name if m is not None else e.name  # a rename arrives in the map first
        nodes: list[tuple[str, Iterable[str]]] = [(name, e.ips)]
        nodes += [(v.name, v.ips) for v in peers]
        extra = getattr(m, "dns_records", ()) if m is not None else ()
        self.resolver.zone = dnszone.build(
            (m.domain if m is not None else e.domain) or "mesh",
            nodes,
            extra,
            (e.ipv4_prefix, e.ipv6_prefix),
        )
