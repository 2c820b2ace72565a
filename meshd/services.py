"""meshd's optional services, each on only when asked for (or possible): the Prometheus listener
(``--metrics-listen``), the mesh resolver (``--dns``), advertised routes and exit node
(``--advertise-routes``, ``--advertise-exit-node``), path reports, and the peer relay server
(``--peer-relay-ports``). The daemon starts them once the mesh is up; meshd.teardown stops them.

Only advertising may give up and stop meshd (it is part of what the user asked the node to be); a
resolver that cannot bind, a coordinator that refuses path reports, or a peer relay in trouble must not
stop the mesh, so those loops restart for ever (meshd.supervise).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from meshd import pathreport
from meshd.options import DaemonError

if TYPE_CHECKING:
    from meshd import metrics
    from meshd.control import ControlClient
    from meshd.daemon import Daemon


async def start_metrics(d: Daemon) -> metrics.MetricsServer | None:
    """The /metrics listener when ``--metrics-listen`` asks for it; DaemonError when it cannot bind."""
    if d.opts.metrics_listen is None:
        return None
    from meshd import metrics  # here: prometheus_client only when metrics are asked for

    server = metrics.MetricsServer(d, *d.opts.metrics_listen)
    try:
        await server.start()
    except OSError as e:
        where = "{}:{}".format(*d.opts.metrics_listen)
        raise DaemonError(f"cannot serve metrics on {where}: {e.strerror or e}") from None
    return server


def start_loops(d: Daemon, client: ControlClient, give_up_after: int) -> None:
    """The optional services' supervised loops (module docstring)."""
    d.routes.control_url = ",".join(client.urls)
    d.tasks.start("advertise", lambda: d.routes.advertise_loop(client), give_up_after=give_up_after)
    d.tasks.start("pathreport", lambda: pathreport.report_loop(d))
    if d.signals is not None and d.signals.server is not None:
        d.tasks.start("peer-relay", d.signals.server.run)
    if d.dns.enabled:
        d.tasks.start("dns", d.dns.serve)
