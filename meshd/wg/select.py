"""Choosing a backend: `--wg-backend auto|kernel|userspace`.

auto = kernel when this kernel can create a wireguard link (tried for real, with a throw-away link
that is deleted again), else userspace when wireguard-go is on PATH, else BackendUnavailable naming both
fixes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from typing import Literal

from meshd.wg import link
from meshd.wg.base import WireGuardBackend
from meshd.wg.errors import BackendUnavailable, WgConfigError, WgError
from meshd.wg.kernel import KernelBackend
from meshd.wg.model import check_ifname
from meshd.wg.userspace import UserspaceBackend

BackendKind = Literal["auto", "kernel", "userspace"]
KINDS: tuple[str, ...] = ("auto", "kernel", "userspace")


async def kernel_supported() -> bool:
    """True when a kernel wireguard link can be created here (tries one named wgprobe<pid>).

    The probe link is deleted whatever happens, also when a stop cancels us half-way: the kernel may have
    made the link although we never saw the answer."""
    probe = f"wgprobe{os.getpid() % 100000}"
    try:
        try:
            await link.create_wireguard_link(probe)
        except BackendUnavailable:
            return False
        except WgError:
            pass  # e.g. the probe name exists: creating links of this kind is evidently possible
        return True
    finally:
        with contextlib.suppress(WgError, OSError):
            await asyncio.shield(link.delete_link(probe))


async def open_backend(kind: str, ifname: str, wireguard_go: str = "wireguard-go") -> WireGuardBackend:
    """The backend object for `kind` (not created yet: call `create()`)."""
    check_ifname(ifname)
    if kind == "kernel":
        return KernelBackend(ifname)
    if kind == "userspace":
        return UserspaceBackend(ifname, wireguard_go)
    if kind != "auto":
        raise WgConfigError(f"unknown WireGuard backend {kind!r}: use one of {', '.join(KINDS)}")
    if await kernel_supported():
        return KernelBackend(ifname)
    if shutil.which(wireguard_go) is not None:
        return UserspaceBackend(ifname, wireguard_go)
    raise BackendUnavailable(
        "no WireGuard backend: load the kernel module (modprobe wireguard) or "
        "install wireguard-go (apt-get install wireguard-go)"
    )
