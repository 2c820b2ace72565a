"""Link, address, MTU and route handling over rtnetlink (pyroute2 AsyncIPRoute), shared by both backends.

Typed adapter: only this module (and kernel.py for the WireGuard genl family) touches pyroute2 messages.
Everything works in the current network namespace (the daemon is started inside it with `ip netns exec`).

Routes we install carry the routing protocol number `ROUTE_PROTO` so that reconciling only ever removes
routes this module added, never somebody else's.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from meshd.netlink import netlink_call
from meshd.wg.diff import plan_set
from meshd.wg.errors import BackendUnavailable, InterfaceInUse, NetlinkFailure

# pyroute2 is imported by each call, not with this module: importing it is ~30-65 ms of CPU that `meshd
# up` spends only when it reaches the interface, after enrollment (issue 15); later calls: a look-up
if TYPE_CHECKING:
    from pyroute2.iproute.linux import AsyncIPRoute
    from pyroute2.netlink.exceptions import NetlinkError

ROUTE_PROTO = 77  #: rtm_protocol of the per-peer routes (shows as "proto 77" in `ip route`)
_MAIN_TABLE = 254


def _fail(what: str, err: NetlinkError) -> NetlinkFailure:
    return NetlinkFailure(f"{what}: {err.args[1] if len(err.args) > 1 else err}")


def exists(ifname: str) -> bool:
    """A link of this name exists in this namespace. One ioctl, no netlink: wireguard-go's start need not
    wait for pyroute2's import (~50 ms of CPU), which the first netlink call after it pays (issue 15)."""
    try:
        socket.if_nametoindex(ifname)
    except OSError:
        return False
    return True


@netlink_call
async def link_index(ifname: str) -> int | None:
    """Index of the link named `ifname` in this namespace, or None."""
    from pyroute2.iproute.linux import AsyncIPRoute

    async with AsyncIPRoute() as ipr:
        found: list[int] = await ipr.link_lookup(ifname=ifname)
    return found[0] if found else None


@netlink_call
async def link_kind(ifname: str) -> str | None:
    """The rtnetlink kind ("wireguard", "tun", "veth", ...) of a link, "" when it has none, None if absent."""
    from pyroute2.iproute.linux import AsyncIPRoute

    async with AsyncIPRoute() as ipr:
        found: list[int] = await ipr.link_lookup(ifname=ifname)
        if not found:
            return None
        msgs: list[Any] = await ipr.link("get", index=found[0])
    kind = msgs[0].get(("IFLA_LINKINFO", "IFLA_INFO_KIND"))
    return str(kind) if kind else ""


@netlink_call
async def create_wireguard_link(ifname: str) -> None:
    """Create a kernel WireGuard link; BackendUnavailable when the kernel has no WireGuard."""
    from pyroute2.iproute.linux import AsyncIPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        async with AsyncIPRoute() as ipr:
            await ipr.link("add", ifname=ifname, kind="wireguard")
    except NetlinkError as e:
        if e.code == errno.EEXIST:
            raise InterfaceInUse(
                f"interface {ifname} already exists; choose another --interface or delete it"
            ) from None
        if e.code in (errno.EOPNOTSUPP, errno.ENODEV, errno.EINVAL):
            raise BackendUnavailable(f"the kernel cannot create a wireguard link ({e.args[1]})") from None
        raise _fail(f"creating wireguard link {ifname}", e) from None


@netlink_call
async def delete_link(ifname: str) -> None:
    """Delete a link if it exists."""
    from pyroute2.iproute.linux import AsyncIPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    async with AsyncIPRoute() as ipr:
        found: list[int] = await ipr.link_lookup(ifname=ifname)
        if not found:
            return
        try:
            await ipr.link("del", index=found[0])
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                raise _fail(f"deleting {ifname}", e) from None


@netlink_call
async def set_up(ifname: str, up: bool = True) -> None:
    from pyroute2.iproute.linux import AsyncIPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    async with AsyncIPRoute() as ipr:
        index = await _index(ipr, ifname)
        try:
            await ipr.link("set", index=index, state="up" if up else "down")
        except NetlinkError as e:
            raise _fail(f"setting {ifname} {'up' if up else 'down'}", e) from None


@netlink_call
async def sync_link(
    ifname: str,
    addresses: Iterable[str],
    mtu: int | None,
    routes: Iterable[str],
    up: bool = True,
    *,
    local: Iterable[str] = (),
) -> None:
    """Make the link match: exactly these addresses (IPv6 link-local ones are left alone) plus the
    ``local`` ones with scope host (never chosen as a source address), MTU (None = leave), up/down, and
    exactly these routes (our ROUTE_PROTO ones) via the link. Works by diff."""
    from pyroute2.iproute.linux import AsyncIPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    async with AsyncIPRoute() as ipr:
        index = await _index(ipr, ifname)
        msgs: list[Any] = await ipr.link("get", index=index)
        current_mtu = msgs[0].get("IFLA_MTU")
        is_up = bool(msgs[0]["flags"] & 1)
        try:
            if mtu is not None and mtu != current_mtu:
                await ipr.link("set", index=index, mtu=mtu)
            if up != is_up:
                await ipr.link("set", index=index, state="up" if up else "down")
        except NetlinkError as e:
            raise _fail(f"configuring {ifname}", e) from None

        # an address is "a/len" or "a/len host" (scope host): a wrong scope is a remove plus an add
        have = [
            f"{m.get('IFA_ADDRESS')}/{m['prefixlen']}" + (" host" if m["scope"] == _SCOPE_HOST else "")
            async for m in await ipr.addr("dump", index=index)
            if m["index"] == index
        ]
        have = [a for a in have if not ipaddress.ip_interface(a.split()[0]).is_link_local]
        plan = plan_set([*addresses, *(f"{a} host" for a in local)], have)
        for text in plan.remove:
            addr = ipaddress.ip_interface(text.split()[0])
            await _quiet(ipr.addr("del", index=index, address=str(addr.ip), prefixlen=addr.network.prefixlen))
        for text in plan.add:
            addr = ipaddress.ip_interface(text.split()[0])
            scope = {"scope": _SCOPE_HOST} if text.endswith(" host") else {}
            try:
                await ipr.addr(
                    "add", index=index, address=str(addr.ip), prefixlen=addr.network.prefixlen, **scope
                )
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise _fail(f"adding address {text} to {ifname}", e) from None

        if not up:
            return  # the kernel drops routes of a down link; nothing to sync
        ours: list[str] = []
        for family in (2, 10):
            async for m in await ipr.route("dump", family=family):
                if m.get("RTA_OIF") == index and m["proto"] == ROUTE_PROTO and m["table"] == _MAIN_TABLE:
                    ours.append(str(ipaddress.ip_network(f"{m.get('RTA_DST')}/{m['dst_len']}")))
        rplan = plan_set(routes, ours)
        for dst in rplan.remove:
            await _quiet(ipr.route("del", dst=dst, oif=index, proto=ROUTE_PROTO))
        for dst in rplan.add:
            try:
                await ipr.route("replace", dst=dst, oif=index, proto=ROUTE_PROTO)
            except NetlinkError as e:
                raise _fail(f"adding route {dst} via {ifname}", e) from None


_SCOPE_HOST = 254  #: RT_SCOPE_HOST


async def _index(ipr: AsyncIPRoute, ifname: str) -> int:
    found: list[int] = await ipr.link_lookup(ifname=ifname)
    if not found:
        raise NetlinkFailure(f"interface {ifname} does not exist")
    return found[0]


async def _quiet(request: Any) -> None:
    """Await a delete; the thing already being gone is fine."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        await request
    except NetlinkError as e:
        if e.code not in (errno.ESRCH, errno.ENOENT, errno.EADDRNOTAVAIL, errno.ENODEV):
            raise _fail("netlink delete", e) from None
