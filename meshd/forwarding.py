"""The router side of subnet routes and exit nodes: IP forwarding and masquerading (issue 17).

A node whose approved routes are non-empty forwards packets from the mesh interface to them: the
``net.ipv4.ip_forward`` (and, for IPv6 prefixes, ``net.ipv6.conf.all.forwarding``) sysctls are switched
on, and restored to what they were when meshd stops. By default the forwarded packets are masqueraded
(source NAT to the router's own address on the outgoing interface), so hosts on the LAN need no route
back to the mesh; ``--snat-subnet-routes=false`` keeps the mesh source addresses (the LAN then routes
100.64.0.0/10 back through this node itself). An exit node's traffic is always masqueraded.

Masquerading lives in its own nftables table, ``inet meshd_<ifname>_nat``, replaced in one ``nft -f``
transaction, deleted at stop and by crash clean-up (meshd/runtime.py). Who may use the routes is not
decided here: the inbound firewall (meshd/firewall.py, rules with ``dst``) drops what the policy does not
allow before it is routed. :func:`render` is pure.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import Iterable
from pathlib import Path

from meshd.firewall import _IFNAME_OK, FirewallError, run_nft, table_name

log = logging.getLogger("meshd.forwarding")

SYSCTL = Path("/proc/sys/net")
IPV4_FORWARD = "ipv4/ip_forward"
IPV6_FORWARD = "ipv6/conf/all/forwarding"


def nat_table(ifname: str) -> str:
    return table_name(ifname) + "_nat"


def render(ifname: str, prefixes: Iterable[str], snat: bool, exit_node: bool) -> str | None:
    """The nft script for masquerading towards `prefixes` (None: no table wanted)."""
    if not _IFNAME_OK.fullmatch(ifname):
        raise FirewallError(f"interface name {ifname!r} is not valid")
    nets = [ipaddress.ip_network(p) for p in prefixes]
    body: list[str] = []
    for family, version in (("ip", 4), ("ip6", 6)):
        if exit_node and any(n.version == version and n.prefixlen == 0 for n in nets):
            body.append(f'iifname "{ifname}" oifname != "{ifname}" meta nfproto ipv{version} masquerade')
            continue
        mine = [str(n) for n in nets if n.version == version]
        if snat and mine:
            body.append(
                f'iifname "{ifname}" oifname != "{ifname}" {family} daddr {{ {", ".join(mine)} }} masquerade'
            )
    if not body:
        return None
    table = nat_table(ifname)
    return (
        "\n".join(
            [
                f"table inet {table}",
                f"delete table inet {table}",
                f"table inet {table} {{",
                "\tchain postrouting {",
                "\t\ttype nat hook postrouting priority srcnat; policy accept;",
                *(f"\t\t{line}" for line in body),
                "\t}",
                "}",
            ]
        )
        + "\n"
    )


def remove_script(ifname: str) -> str:
    table = nat_table(ifname)
    return f"table inet {table}\ndelete table inet {table}\n"


def remove_table(ifname: str, timeout: float = 2.0) -> None:
    """Delete the masquerading table if it exists (stop and crash clean-up; never raises)."""
    with contextlib.suppress(FirewallError):
        run_nft(remove_script(ifname), timeout)


def _read(key: str) -> str | None:
    try:
        return (SYSCTL / key).read_text().strip()
    except OSError:
        return None


def _write(key: str, value: str) -> None:
    try:
        (SYSCTL / key).write_text(value + "\n")
    except OSError as e:
        log.error("cannot set net.%s=%s: %s", key.replace("/", "."), value, e.strerror)


class Forwarding:
    """What this node does for the prefixes it routes; `update` is cheap when nothing changed."""

    def __init__(self, ifname: str, snat: bool = True) -> None:
        self.ifname = ifname
        self.snat = snat
        self.prefixes: tuple[str, ...] = ()
        self._saved: dict[str, str] = {}  #: sysctl -> value before we changed it

    def _enable(self, key: str) -> None:
        if key in self._saved:
            return
        before = _read(key)
        if before is None:
            return
        self._saved[key] = before
        if before != "1":
            _write(key, "1")
            log.info("forwarding: net.%s=1 (was %s)", key.replace("/", "."), before)

    def update(self, prefixes: tuple[str, ...]) -> None:
        """Forward and masquerade for exactly `prefixes` (this node's approved routes). Blocking (nft)."""
        if prefixes == self.prefixes:
            return
        nets = [ipaddress.ip_network(p) for p in prefixes]
        if any(n.version == 4 for n in nets):
            self._enable(IPV4_FORWARD)
        if any(n.version == 6 for n in nets):
            self._enable(IPV6_FORWARD)
        exit_node = any(n.prefixlen == 0 for n in nets)
        script = render(self.ifname, prefixes, self.snat, exit_node)
        run_nft(script if script is not None else remove_script(self.ifname))
        self.prefixes = prefixes
        log.info("routing for peers: %s", ", ".join(prefixes) or "nothing")

    def close(self) -> None:
        """Remove the table and put the sysctls back (blocking, bounded by nft's timeout)."""
        if self.prefixes:
            remove_table(self.ifname)
        for key, value in self._saved.items():
            if value != "1":
                _write(key, value)
        self._saved.clear()
        self.prefixes = ()
