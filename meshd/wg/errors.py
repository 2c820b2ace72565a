"""The one exception family of the WireGuard backends.

Every expected failure (bad config value, UAPI error reply, missing backend, interface name clash) raises a
`WgError` subclass whose message is one line saying what went wrong and, where there is one, what to do.
"""

from __future__ import annotations


class WgError(Exception):
    """Base of all WireGuard backend errors; `str(err)` is a one-line message for the user."""


class WgConfigError(WgError, ValueError):
    """A configuration value (key, address, endpoint, port) is malformed."""


class UapiError(WgError):
    """A UAPI exchange failed: malformed text from wireguard-go, or a non-zero ``errno=N`` reply.

    `errno` is the value wireguard-go sent (None when the text itself was malformed).
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class BackendUnavailable(WgError):
    """The requested backend cannot run on this host (no kernel module, no wireguard-go binary)."""


class InterfaceInUse(WgError):
    """The interface name is already taken (here or, for wireguard-go, in another network namespace)."""


class NetlinkFailure(WgError):
    """A netlink request (link, address, route, WireGuard genl) was refused by the kernel."""
