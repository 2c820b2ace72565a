"""The namespace NAT lab: an isolated internet of routers, hosts and servers for integration tests.

    from tests.netns.lab import Lab
    with Lab() as lab:
        a = lab.host(nat="upnp"); b = lab.host(nat="edm"); s = lab.server()
        a.run(["ping", "-c1", s.ip], check=True)

See :mod:`tests.netns.lab.topology` for the addressing plan and :mod:`tests.netns.lab.nat` for the kinds.
"""

from tests.netns.lab.nat import NatKind
from tests.netns.lab.netns import LabError, Namespace, list_namespaces, sweep_stale
from tests.netns.lab.topology import ECHO_PORT, ECHO_SCRIPT, Host, Lab, Router

__all__ = [
    "ECHO_PORT",
    "ECHO_SCRIPT",
    "Host",
    "Lab",
    "LabError",
    "Namespace",
    "NatKind",
    "Router",
    "list_namespaces",
    "sweep_stale",
]
