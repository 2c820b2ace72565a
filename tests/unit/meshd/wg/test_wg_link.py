"""meshd/wg/link.py: whether a link exists is one ioctl, answered without netlink (issue 15: wireguard-go's
start does not wait for pyroute2's import)."""

from __future__ import annotations

import socket
import sys

from meshd.wg import link


def test_an_existing_link_is_found_and_a_missing_one_is_not() -> None:
    name = socket.if_indextoname(socket.if_nameindex()[0][0])  # whatever this namespace has (lo, usually)
    assert link.exists(name)
    assert not link.exists("meshnope0")


def test_names_the_kernel_cannot_hold_are_not_links() -> None:
    assert not link.exists("x" * 40)  # longer than IFNAMSIZ
    assert not link.exists("")


def test_asking_imports_no_pyroute2() -> None:
    had = {m for m in sys.modules if m.split(".")[0] == "pyroute2"}
    link.exists("meshnope0")
    assert {m for m in sys.modules if m.split(".")[0] == "pyroute2"} == had
