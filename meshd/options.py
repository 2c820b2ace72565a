"""What ``meshd up`` was asked to do (:class:`Options`, built by meshd.cli from its flags), and the one
error type for problems the user must act on (:class:`DaemonError`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from meshd import hosts, rotation

DEFAULT_LISTEN_PORT = 41641


def coordinator_urls(text: str) -> tuple[str, ...]:
    """``--coordinator`` (or the saved URL): one URL or several, comma-separated, without trailing /."""
    cleaned = (u.strip().rstrip("/").strip() for u in text.split(","))  # "x /" is "x", "/" is nothing
    return tuple(dict.fromkeys(u for u in cleaned if u))


class DaemonError(Exception):
    """A failure the user must act on; the message says what to do (printed as one line)."""


@dataclass(frozen=True, slots=True)
class Options:
    coordinator: str | None
    state_dir: Path
    interface: str = "mesh0"
    auth_key: str | None = field(default=None, repr=False)
    hostname: str | None = None
    wg_backend: str = "auto"
    listen_port: int = DEFAULT_LISTEN_PORT
    hosts_file: Path = hosts.DEFAULT_HOSTS_FILE
    approval_wait: float = 3600.0
    key_rotation: float = rotation.DEFAULT_INTERVAL  #: seconds between WireGuard key rotations; 0: never
    dns: str = "auto"  #: --dns: auto | resolved | hosts | off (meshd/dns/system.py)
    advertise_routes: tuple[str, ...] = ()  #: prefixes offered to the mesh (meshd/router.py)
    advertise_exit_node: bool = False  #: offer 0.0.0.0/0 and ::/0
    snat_subnet_routes: bool = True  #: masquerade forwarded traffic (False: keep mesh source addresses)
    exit_node: str | None = None  #: route internet traffic through this peer (meshd/exitnode.py)
    metrics_listen: tuple[str, int] | None = None  #: (host, port) for Prometheus /metrics; None: off
    #: UDP ports served if the coordinator makes this node a peer relay (issue 14); None: never
    peer_relay_ports: range | None = None
