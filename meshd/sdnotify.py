"""systemd's readiness protocol, sd_notify(3): one datagram to the unix socket in ``$NOTIFY_SOCKET``.

With ``Type=notify`` systemd considers the service started when it receives ``READY=1``; ``STOPPING=1``
says a clean stop has begun and ``STATUS=...`` sets the line ``systemctl status`` shows. Outside
systemd (``$NOTIFY_SOCKET`` unset) every call is a no-op. A name starting with ``@`` is a Linux
abstract socket (the ``@`` stands for a leading NUL byte). Used by meshd and the coordinator.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


def notify(message: str, *, env: Mapping[str, str] | None = None) -> bool:
    """Send ``message`` (e.g. ``"READY=1"``, newline-separated assignments); True if it was sent.

    Never raises: a failure to notify must not stop the daemon (systemd then reports a start timeout).
    """
    path = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    if not path or path[0] not in "/@":
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), address)
    except OSError:
        return False
    return True


def ready(status: str | None = None, *, env: Mapping[str, str] | None = None) -> bool:
    """Tell systemd the service is up (and optionally what it is doing)."""
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""), env=env)


def stopping(*, env: Mapping[str, str] | None = None) -> bool:
    """Tell systemd a clean stop has begun."""
    return notify("STOPPING=1", env=env)


def status(text: str, *, env: Mapping[str, str] | None = None) -> bool:
    """Set the status line ``systemctl status`` shows."""
    return notify(f"STATUS={text}", env=env)
