"""Shell completion of peer names for the meshd CLI (a typer ``autocompletion`` callback).

``meshd --install-completion`` (bash, zsh, fish) installs typer's completion script; on TAB after
``meshd ping`` the shell runs ``meshd`` with ``_MESHD_COMPLETE`` set and :func:`peer_names` asks the local
daemon (``meshd status`` over its control socket) for its peers. Any failure (meshd not running, no
permission on the socket, a slow answer) completes nothing, silently, within ``TIMEOUT`` seconds.
"""

from __future__ import annotations

from pathlib import Path

import typer

from meshd import api
from meshd.state import DEFAULT_STATE_DIR, StateDir

TIMEOUT = 2.0  #: seconds a TAB may wait for the daemon


def peer_names(ctx: typer.Context, incomplete: str) -> list[str]:
    """Names of this node's peers that start with what was typed."""
    # --state-dir may be typed after the subcommand (ctx) or before it (the root); the root callback
    # does not run during completion, so both are read from the parsed parameters
    given = ctx.params.get("state_dir") or ctx.find_root().params.get("state_dir")
    try:
        doc = api.call(StateDir(Path(given or DEFAULT_STATE_DIR)).socket_path, "status", timeout=TIMEOUT)
        names = [str(p["name"]) for p in doc["peers"]]
    except Exception:  # completion fails silently: the user is typing, not asking for an error
        return []
    return sorted(n for n in set(names) if n.startswith(incomplete))
