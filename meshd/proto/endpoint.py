"""The one spelling of a UDP/TCP endpoint in the project: a ``(host, port)`` tuple.

Hosts are IP address literals (WireGuard never resolves names, and neither do probes or STUN).
Every module that moves addresses imports :data:`Endpoint` from here, so there is exactly one
definition to change when IPv6 scope ids or similar need a richer type.
"""

from __future__ import annotations

Endpoint = tuple[str, int]


def format_endpoint(endpoint: Endpoint) -> str:
    """``('::1', 5)`` -> ``'[::1]:5'``; ``('10.0.0.1', 5)`` -> ``'10.0.0.1:5'`` (the `wg` spelling)."""
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
