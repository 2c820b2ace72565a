"""What a running meshd created, recorded in ``<state-dir>/runtime.json`` so that leftovers of a crashed
daemon (its interface, its hosts block, its firewall table, the sockets it listened on) can be removed by
the next ``meshd up`` or by ``meshd down``. A clean stop removes all of it itself and this file last.

Port maps are not in the record: the next start asks with the same PCP nonce (the router hands the same
mapping back) and removes UPnP maps carrying its description; the router forgets the rest at lease end."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from meshd import exitnode, firewall, forwarding, hosts
from meshd.state import SOCKET_FILE
from meshd.wg import link
from meshd.wg.errors import WgError
from meshd.wg.userspace import socket_answers, socket_path

RUNTIME_FILE = "runtime.json"


@dataclass(frozen=True, slots=True)
class Runtime:
    pid: int
    interface: str
    hosts_file: str
    backend: str


def path(state_dir: Path) -> Path:
    return state_dir / RUNTIME_FILE


def write(state_dir: Path, rt: Runtime) -> None:
    p = path(state_dir)
    tmp = p.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(rt), f)
    os.replace(tmp, p)


def read(state_dir: Path) -> Runtime | None:
    try:
        raw = json.loads(path(state_dir).read_text())
        return Runtime(int(raw["pid"]), str(raw["interface"]), str(raw["hosts_file"]), str(raw["backend"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def clear(state_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path(state_dir).unlink()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def clean_leftovers(state_dir: Path) -> Runtime | None:
    """Remove what a dead meshd of this state dir left behind; returns that record (None if nothing).

    Does nothing when the recorded daemon still runs (the caller finds that out from the socket).
    """
    rt = read(state_dir)
    if rt is None or (rt.pid != os.getpid() and alive(rt.pid)):
        return None
    with contextlib.suppress(WgError):
        if await link.link_index(rt.interface) is not None:
            await link.delete_link(rt.interface)
    with contextlib.suppress(hosts.HostsError):
        hosts.HostsFile(Path(rt.hosts_file), tag=rt.interface).remove()
    firewall.remove_table(rt.interface)
    forwarding.remove_table(rt.interface)  # masquerading for routes we carried (issue 17)
    from pyroute2.netlink.exceptions import NetlinkError  # here: pyroute2 only when there are leftovers

    with contextlib.suppress(OSError, NetlinkError):
        await exitnode.clear()  # policy routing towards an exit node (issue 17)
    # sockets of a process that died by SIGKILL (wireguard-go removes its own when it stops cleanly)
    uapi = socket_path(rt.interface)
    if rt.backend == "userspace" and uapi.exists() and not await socket_answers(uapi):
        with contextlib.suppress(FileNotFoundError):
            uapi.unlink()
    with contextlib.suppress(FileNotFoundError):
        (state_dir / SOCKET_FILE).unlink()  # the control socket: its daemon is dead (checked above)
    clear(state_dir)
    return rt
