"""Sending this host's internet traffic through an exit node: policy routing, as wg-quick does (issue 17).

While an exit node is in use (``meshd up --exit-node NAME``, ``meshd set --exit-node NAME|none``), the
exit node's peer has 0.0.0.0/0 and ::/0 in its WireGuard allowed IPs (meshd.routing), and:

- routing table ``TABLE`` (51820) holds one default route per family via the mesh interface; for IPv6
  an ``unreachable`` default when the exit node carries no ::/0, so IPv6 is blocked rather than leaked;
- WireGuard's own packets carry fwmark ``TABLE`` (the device's fwmark), so the underlay never enters it;
- rules, in this order: to the coordinator's and relays' addresses ``lookup main`` (the control plane and
  the relay stay on the normal path even when the exit node is dead); ``lookup main
  suppress_prefixlength 0`` (every route of the main table but its default: the LAN, the mesh peers);
  ``not fwmark TABLE lookup TABLE`` (the rest: the internet, through the exit node).

Nothing in the main table is touched, so taking the rules and the table away restores the old routes
exactly. Clean-up: :func:`clear` (stop, crash clean-up in meshd/runtime.py).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterable

from meshd.netlink import netlink_call

# pyroute2 is imported by the calls, not with meshd: `meshd up` imports it when it first reaches netlink,
# after enrollment (meshd.wg.link, issue 15)

log = logging.getLogger("meshd.exitnode")

TABLE = 51820  #: routing table and fwmark (wg-quick's number)
PRIO_KEEP = 5200  #: control-plane addresses stay on main
PRIO_SUPPRESS = 5210  #: main without its default route
PRIO_EXIT = 5220  #: everything else through the exit node
_PRIOS = (PRIO_KEEP, PRIO_SUPPRESS, PRIO_EXIT)
_FAMILIES = (2, 10)  #: AF_INET, AF_INET6


async def _quiet(request: object) -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        await request  # type: ignore[misc]
    except NetlinkError as e:
        if e.code not in (errno.ENOENT, errno.ESRCH, errno.EEXIST):
            raise


@netlink_call
async def clear() -> None:
    """Remove our rules and table (whatever is there; never raises for what is already gone)."""
    from pyroute2.iproute.linux import AsyncIPRoute

    async with AsyncIPRoute() as ipr:
        for family in _FAMILIES:
            async for rule in await ipr.rule("dump", family=family):
                if rule.get("priority") in _PRIOS:
                    await _quiet(ipr.rule("del", family=family, priority=rule.get("priority")))
            async for route in await ipr.route("dump", family=family, table=TABLE):
                if route.get("table") == TABLE:
                    await _quiet(
                        ipr.route(
                            "del",
                            family=family,
                            table=TABLE,
                            dst="default" if family == 2 else "::/0",
                            type=route.get("type"),
                        )
                    )


@netlink_call
async def install(ifname: str, keep: Iterable[str], ipv6: bool) -> None:
    """Route everything but `keep` (addresses), the main table's non-default routes and WireGuard's own
    packets through `ifname`. `ipv6`: the exit node carries ::/0 (else IPv6 to the internet is refused)."""
    from pyroute2.iproute.linux import AsyncIPRoute

    await clear()
    async with AsyncIPRoute() as ipr:
        found: list[int] = await ipr.link_lookup(ifname=ifname)
        if not found:
            raise OSError(errno.ENODEV, f"no interface {ifname}")
        index = found[0]
        await ipr.route("replace", dst="0.0.0.0/0", oif=index, table=TABLE)
        if ipv6:
            await ipr.route("replace", family=10, dst="::/0", oif=index, table=TABLE)
        else:
            await ipr.route("replace", family=10, dst="::/0", type="unreachable", table=TABLE)
        for addr in keep:
            family, bits = (10, 128) if ":" in addr else (2, 32)
            await _quiet(
                ipr.rule("add", family=family, dst=addr, dst_len=bits, table=254, priority=PRIO_KEEP)
            )
        for family in _FAMILIES:
            await ipr.rule("add", family=family, table=254, suppress_prefixlen=0, priority=PRIO_SUPPRESS)
            await ipr.rule(
                "add",
                family=family,
                table=TABLE,
                fwmark=TABLE,
                fwmask=0xFFFFFFFF,
                priority=PRIO_EXIT,
                flags=0x2,  # FIB_RULE_INVERT: "not fwmark"
            )
    log.info("exit node: internet traffic through %s (IPv6 %s)", ifname, "too" if ipv6 else "blocked")
