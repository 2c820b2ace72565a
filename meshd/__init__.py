"""meshd: the per-host daemon of the mesh VPN."""

import sys

# httpx imports its own command-line client (click, rich, pygments: ~75 ms of CPU at every meshd start,
# before the first packet; issue 15) whenever those are installed. meshd never calls it, and httpx
# falls back without it (its __init__ catches the ImportError that a None entry here raises).
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]  # None: "not importable"
