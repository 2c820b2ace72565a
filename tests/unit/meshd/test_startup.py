"""meshd/startup.py: the daemon's process skips optional imports it never uses (issue 15)."""

from __future__ import annotations

import subprocess
import sys
import types
from collections.abc import Iterator

import pytest

from meshd.startup import LEAN, UNUSED, skip_unused_imports


@pytest.fixture
def modules() -> Iterator[None]:
    """skip_unused_imports() in this process: what it registers goes again after the test."""
    saved = {name: sys.modules[name] for name in UNUSED + LEAN if name in sys.modules}
    yield
    for name in UNUSED + LEAN:
        sys.modules.pop(name, None)
    sys.modules.update(saved)


#: in a fresh process: skip, then one real HTTP request through httpx/httpcore on asyncio (loopback)
CODE = """
import asyncio, sys
from meshd.startup import skip_unused_imports
skip_unused_imports()
import httpx

async def serve(reader, writer):
    await reader.readuntil(b"\\r\\n\\r\\n")
    writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\nConnection: close\\r\\n\\r\\nok")
    await writer.drain()
    writer.close()

async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
        r = await client.get("/")
    server.close()
    print(r.status_code, r.text, sys.modules.get("trio") is not None)

asyncio.run(main())
"""


def test_the_coordinator_client_works_without_importing_trio() -> None:
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["200", "ok", "False"]


@pytest.mark.usefixtures("modules")
def test_skipping_leaves_an_already_imported_module_alone() -> None:
    fake = types.ModuleType(UNUSED[0])
    saved = sys.modules.get(UNUSED[0])
    had = UNUSED[0] in sys.modules
    sys.modules[UNUSED[0]] = fake
    try:
        skip_unused_imports()
        assert sys.modules[UNUSED[0]] is fake
    finally:
        if had:
            sys.modules[UNUSED[0]] = saved  # type: ignore[assignment]
        else:
            del sys.modules[UNUSED[0]]


#: what `meshd up` imports before its first netlink call, enrollment and the first DNS query
STARTUP_CODE = """
import sys
import meshd.cli, meshd.daemon
print(" ".join(sorted({m.split(".")[0] for m in sys.modules})))
"""


def test_the_daemon_starts_without_pyroute2_dnspython_or_websockets() -> None:
    """Imported where first used (issue 15): the interface (after enrollment), the first DNS query (or a
    thread after start-up: meshd.dns.server), the map stream."""
    out = subprocess.run([sys.executable, "-c", STARTUP_CODE], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert not {"pyroute2", "dns", "websockets", "prometheus_client"} & set(out.stdout.split())


def test_what_start_up_leaves_out_can_be_imported_ahead() -> None:
    code = "from meshd.startup import DEFERRED, import_deferred; import_deferred(); print(*DEFERRED)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert {"pyroute2.iproute.linux", "meshd.dns.wire"} <= set(out.stdout.split())


#: in a fresh process, as `meshd up` does: skip, then what the daemon's netlink calls import
LEAN_CODE = """
import sys
from meshd.startup import skip_unused_imports
skip_unused_imports()
import meshd.cli, meshd.daemon
import pyroute2.iproute.linux, pyroute2.netlink.exceptions, pyroute2.netlink.generic.wireguard
print(" ".join(sorted({m.split(".")[1] for m in sys.modules if m.startswith("pyroute2.")})))
import threading
from pyroute2.iproute.linux import IPRoute as Linux
seen = []
def ask():  # a name that is no submodule: the whole package, as without the skip, in every thread at once
    from pyroute2 import NDB, IPRoute
    seen.append(IPRoute is Linux)
threads = [threading.Thread(target=ask) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(seen == [True] * 4, "pyroute2.ndb" in sys.modules)
"""


def test_the_daemon_imports_the_pyroute2_submodules_it_uses_and_not_the_package() -> None:
    out = subprocess.run([sys.executable, "-c", LEAN_CODE], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    used, whole = out.stdout.splitlines()
    assert "iproute" in used.split() and "netlink" in used.split()
    assert not {"ndb", "ipdb", "conntrack", "ipset", "nftables", "plan9", "ethtool", "iwutil"} & set(
        used.split()
    )
    assert whole == "True True"


@pytest.mark.usefixtures("modules")
def test_an_imported_pyroute2_is_left_alone() -> None:
    import pyroute2

    skip_unused_imports()
    assert sys.modules["pyroute2"] is pyroute2 and "__getattr__" not in vars(pyroute2)


#: the console script's main() in a fresh process, with the CLI replaced by a probe of the collector
GC_CODE = """
import gc, sys
import meshd.cli
from meshd import startup
meshd.cli.main = lambda: print(gc.isenabled(), gc.get_freeze_count() > 0)
sys.argv = ["meshd", *sys.argv[1:]]
startup.main()
"""


@pytest.mark.parametrize(("argv", "on"), [(["status"], "True True"), (["up", "--help"], "False False")])
def test_the_collector_is_off_while_meshd_up_starts_and_on_for_other_commands(
    argv: list[str], on: str
) -> None:
    """Module docstring of meshd/startup.py: ``meshd up`` turns it on itself (Daemon.run/_main)."""
    out = subprocess.run(
        [sys.executable, "-c", GC_CODE, *argv], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == on


def test_resuming_the_collector_freezes_once_and_turns_it_on() -> None:
    code = (
        "import gc; from meshd import startup; gc.disable(); startup.resume_gc(); n = gc.get_freeze_count();"
        "[object() for _ in range(10)]; startup.resume_gc();"
        "print(gc.isenabled(), n > 0, gc.get_freeze_count() == n)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["True", "True", "True"]
