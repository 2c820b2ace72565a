"""Shell completion of node and user names for the coordinator CLI (typer ``autocompletion`` callbacks).

``coordinator --install-completion`` (bash, zsh, fish) installs typer's completion script; while the user
presses TAB the shell runs ``coordinator`` with ``_COORDINATOR_COMPLETE`` set, and these callbacks ask the
coordinator for names: over ``<state-dir>/admin.sock``, or the remote coordinator and token named by
``--url`` / ``--token-file`` (or their environment variables), as the command itself would. Completion must
never get in the way: any failure (no server, no permission, a slow answer) completes nothing, silently,
within ``TIMEOUT`` seconds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer

from coordinator import adminclient
from coordinator.settings import DEFAULT_STATE_DIR

TIMEOUT = 2.0  #: seconds a TAB may wait for the coordinator


def _root_params(ctx: typer.Context) -> dict[str, Any]:
    """The global options as typed so far (during completion the root callback does not run)."""
    return dict(ctx.find_root().params)


def _get(ctx: typer.Context, path: str) -> list[dict[str, Any]]:
    params = _root_params(ctx)
    try:
        url = params.get("url") or os.environ.get("COORDINATOR_URL")
        if url:
            token_file = params.get("token_file") or os.environ.get("COORDINATOR_TOKEN_FILE")
            if not token_file:
                return []
            token = adminclient.read_token_file(Path(token_file))
            ca = params.get("ca_cert")
            client = adminclient.RemoteClient(url, token, ca, timeout=TIMEOUT)
            try:
                result = client.call("GET", path)
            finally:
                client.close()
        else:
            env = os.environ.get("COORDINATOR_STATE_DIR")
            state = params.get("state_dir") or (Path(env) if env else DEFAULT_STATE_DIR)
            result = adminclient.call(Path(state) / "admin.sock", "GET", path, timeout=TIMEOUT)
    except Exception:  # completion fails silently: the user is typing, not asking for an error
        return []
    return [r for r in result if isinstance(r, dict)] if isinstance(result, list) else []


def _matching(names: list[str], incomplete: str) -> list[str]:
    return sorted(n for n in set(names) if n.startswith(incomplete))


def node_names(ctx: typer.Context, incomplete: str) -> list[str]:
    """Names of the enrolled nodes that start with what was typed."""
    return _matching([str(n.get("name", "")) for n in _get(ctx, "/admin/nodes")], incomplete)


def user_names(ctx: typer.Context, incomplete: str) -> list[str]:
    """Names of the users that start with what was typed."""
    return _matching([str(u.get("name", "")) for u in _get(ctx, "/admin/users")], incomplete)
