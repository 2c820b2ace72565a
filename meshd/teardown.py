"""The stop: every part of a running meshd removed, each step bounded in time, so that meshd is gone
within 5 s whatever the network or the coordinator does (docs/design.md; tests/netns/test_stop.py).

Order: tell the coordinator we leave (``meshd down`` only), then everything at once (the loops, the
relay links whose reconnects stop first thing, the peer relay, the path strategy, port maps, the control
socket, the metrics listener), then the resolver settings, then firewall, forwarding and the interface
(independent of each other), and last our hosts block and the runtime file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from meshd import hosts, runtime

if TYPE_CHECKING:
    from meshd.daemon import Daemon

log = logging.getLogger("meshd")

STOP_TASKS = 1.0  #: seconds for the loops to end after cancellation
STOP_PARTS = 2.0  #: ... for relay, paths, port maps and the control socket to close (concurrently)
STOP_INTERFACE = 1.5  #: ... for the WireGuard interface to go
LEAVE_WITHIN = 1.0  #: on `meshd down`, how long to wait for the coordinator to hear we leave


async def bounded(what: str, step: Awaitable[Any], within: float) -> None:
    """One tear-down step: whatever it raises or however long it takes, the tear-down goes on."""
    try:
        async with asyncio.timeout(within):
            await step
    except TimeoutError:
        log.warning("stopping: %s took longer than %.1f s; going on", what, within)
    except Exception as e:
        log.warning("stopping: %s: %s", what, e)


async def cancel_leftovers(within: float = 0.5) -> None:
    """Cancel whatever task is still running (a handler of the control socket, a one-off send), bounded:
    asyncio.run() would otherwise cancel them itself and wait without a limit."""
    me = asyncio.current_task()
    rest = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
    for t in rest:
        t.cancel()
    if rest:
        _, pending = await asyncio.wait(rest, timeout=within)
        for t in pending:
            log.warning("stopping: task %s ignored its cancellation", t.get_name())


async def tear_down(d: Daemon) -> None:
    """Remove every part ``d`` brought up (module docstring); the parts are None afterwards."""
    if d.stop_reason == "meshd down" and d._client is not None and d.creds is not None:
        # an ephemeral node is removed at once (coordinator/ephemeral.py); others are left as they are
        await bounded("telling the coordinator we leave", d._client.leave(), LEAVE_WITHIN)
    parts: list[Awaitable[Any]] = [d.tasks.stop(within=STOP_TASKS)]
    if d.relay is not None:
        parts.append(bounded("relay links", d.relay.close(), STOP_PARTS))
    if d.signals is not None:  # the peer relay's sockets, nft table and conntrack entries (issue 14)
        try:
            d.signals.close()
        except Exception as e:  # the tear-down goes on
            log.warning("stopping: peer relay ports: %s", e)
    if d.paths is not None:
        parts.append(bounded("path strategy", d.paths.close(), STOP_PARTS))
    if d.portmap is not None:
        parts.append(bounded("deleting port maps", d.portmap.close(), STOP_PARTS))
    if d._api is not None:
        parts.append(bounded("control socket", d._api.close(), STOP_PARTS))
    if d._metrics is not None:
        parts.append(bounded("metrics listener", d._metrics.close(), STOP_PARTS))
    await asyncio.gather(*parts)
    d.portmap = d.paths = d.relay = d._api = d.signals = d._metrics = None
    await bounded("systemd-resolved link settings", d.dns.close(), STOP_PARTS)
    last = [
        bounded("firewall table", d.firewall.close(), STOP_INTERFACE),
        bounded("forwarding", d.routes.close(), STOP_INTERFACE),
    ]
    if d.backend is not None:
        last.append(bounded(f"removing {d.opts.interface}", d.backend.close(), STOP_INTERFACE))
    await asyncio.gather(*last)  # independent of each other
    d.backend = None
    with contextlib.suppress(hosts.HostsError):
        d.hosts.remove()
    runtime.clear(d.opts.state_dir)
    if d._client is not None:
        await bounded("coordinator client", d._client.aclose(), 0.5)
