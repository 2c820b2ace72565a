"""This host's own addresses (LAN candidates, roaming) and ICMP ping over the mesh interface."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from collections.abc import Awaitable, Callable

log = logging.getLogger("meshd")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
WATCH_INTERVAL = 5.0


def local_networks(exclude: str) -> dict[str, Network]:
    """``{"ifname/addr": network}`` of this host's interfaces (not loopback, not ``exclude``)."""
    from pyroute2.iproute.linux import IPRoute

    out: dict[str, Network] = {}
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for msg in ipr.get_addr():
            name = names.get(msg["index"], "")
            addr = msg.get_attr("IFA_ADDRESS")
            if not addr or name in ("lo", exclude):
                continue
            ip = ipaddress.ip_address(addr)
            if ip.is_loopback or ip.is_link_local:
                continue
            out[f"{name}/{addr}"] = ipaddress.ip_network(f"{addr}/{msg['prefixlen']}", strict=False)
    return out


async def watch(
    exclude: str, on_change: Callable[[dict[str, Network]], Awaitable[None]], interval: float = WATCH_INTERVAL
) -> None:
    """Call ``on_change`` with our networks at start and whenever they change (roaming); polls."""
    current: dict[str, Network] | None = None
    while True:
        try:
            nets = await asyncio.to_thread(local_networks, exclude)
        except Exception as e:  # netlink trouble (pyroute2 raises its own types): keep what we knew
            log.warning("reading local addresses: %s", e)
        else:
            if nets != current:
                current = nets
                await on_change(nets)
        await asyncio.sleep(interval)


def ping_rtt(output: str) -> float | None:
    """The first ``time=1.23 ms`` of ping's output, in ms."""
    m = re.search(r"time[=<]([0-9.]+) ?ms", output)
    return float(m.group(1)) if m else None


async def ping(interface: str, ip: str, count: int = 1) -> float | None:
    """ICMP echo to ``ip`` out of ``interface``; the round trip in ms, None when unanswered."""
    proc = await asyncio.create_subprocess_exec(
        "ping", "-n", "-c", str(count), "-W", "2", "-I", interface, ip,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:  # cancelled (meshd stopping): no orphan ping
            proc.kill()
    return ping_rtt(out.decode(errors="replace"))
