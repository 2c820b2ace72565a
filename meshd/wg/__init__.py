"""WireGuard backends behind one typed interface (DESIGN.md §1 "Data plane").

Public API::

    from meshd.wg import open_backend, InterfaceConfig, PeerConfig
    backend = await open_backend("auto", "mesh0")       # or "kernel" / "userspace"
    await backend.create(); await backend.apply(InterfaceConfig(...)); await backend.close()

See meshd.wg.base for the WireGuardBackend protocol, meshd.wg.model for the values and meshd.wg.diff for
the reconcile rules.
"""

from meshd.proto.endpoint import Endpoint
from meshd.wg.base import WireGuardBackend
from meshd.wg.errors import BackendUnavailable, InterfaceInUse, UapiError, WgConfigError, WgError
from meshd.wg.model import InterfaceConfig, InterfaceState, PeerConfig, PeerState
from meshd.wg.select import KINDS, open_backend

__all__ = [
    "KINDS",
    "BackendUnavailable",
    "Endpoint",
    "InterfaceConfig",
    "InterfaceInUse",
    "InterfaceState",
    "PeerConfig",
    "PeerState",
    "UapiError",
    "WgConfigError",
    "WgError",
    "WireGuardBackend",
    "open_backend",
]
