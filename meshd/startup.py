"""What the daemon's process start-up can skip (issue 15: first ping sooner).

httpcore (under httpx, which talks to the coordinator) imports trio whenever it is installed, to find
out at run time whether it runs under trio or asyncio. meshd runs asyncio only, and trio is no
dependency of ours, but where another package pulled it in (Selenium does, on this test machine)
importing it costs ~40-70 ms of CPU before the first request to the coordinator: a quarter of the time
from ``starting`` to ``enrolled``. The ``meshd up`` process marks it as absent, which is what httpcore
is written for (``trio = None`` on ImportError). Only that process: a test or tool that imports meshd
next to its own trio code is left alone.

pyroute2's package ``__init__`` imports every part of the library (~160 modules: NDB, IPDB, conntrack,
ipset, nl80211, plan9 ...) whichever one is asked for; meshd uses three classes of two submodules
(``pyroute2.iproute.linux``, ``pyroute2.netlink.generic.wireguard``) and ``NetlinkError``. The ``meshd
up`` process registers the package without running that ``__init__`` (:func:`lean_package`): its
submodules import what they need themselves (``from pyroute2 import config``: submodules, found by the
import system) and set nothing up in the package. Importing them is ~30 ms of CPU instead of ~65 ms.
The first name asked of the package that is no submodule (``from pyroute2 import NDB``) runs the real
``__init__`` then, so nothing that expects the whole package breaks; only it costs the time again.

Python's cyclic garbage collector ran ~80 times during the imports alone (~25-30 ms of CPU of ~230,
every object made then lives as long as the process). The ``meshd`` command (:func:`main`) starts with
the collector off; other commands turn it on once their modules are in, ``meshd up`` once it is up (or
after :data:`GC_PAUSE_MAX` s whatever happens), and then freezes what exists (``gc.freeze``: later
collections never walk the modules, classes and functions again).
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import sys
import threading

#: optional imports of our dependencies that the daemon never uses
UNUSED = ("trio",)

#: packages whose ``__init__`` the daemon's process skips (module docstring)
LEAN = ("pyroute2",)

#: what the daemon imports where first used, after enrollment (netlink calls, the map stream, the first
#: DNS query): not at start-up, so that a thread can import them while enrollment waits on the network
DEFERRED = (
    "pyroute2.iproute.linux",
    "pyroute2.netlink.exceptions",
    "pyroute2.netlink.generic.wireguard",
    "websockets.asyncio.client",
    "meshd.dns.wire",
)


GC_PAUSE_MAX = 5.0  #: seconds after the daemon's start at most without the cyclic collector
GC_AFTER_UP = 1.0  #: seconds after "meshd up": the first handshakes and pings come without a collection


def main() -> None:
    """The ``meshd`` console script: the CLI with the collector off while it starts (module docstring)."""
    gc.disable()
    from meshd import cli

    if sys.argv[1:2] != ["up"]:
        resume_gc()
    cli.main()


def resume_gc() -> None:
    """Freeze what exists and turn the collector on (once; later calls do nothing)."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def skip_unused_imports() -> None:
    """Make ``import trio`` (and the like) fail fast in this process, unless already imported; register
    pyroute2 without its package ``__init__`` (module docstring)."""
    for name in UNUSED:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]
    for name in LEAN:
        lean_package(name)


def lean_package(name: str) -> None:
    """Register package `name` with its submodules importable and its ``__init__`` not run until a
    name that is no submodule is asked of it. Nothing when it is imported already or not installed."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return
    package = importlib.util.module_from_spec(spec)  # __path__, __spec__, __file__: not executed
    loader = spec.loader
    # the netlink thread (meshd.netlink) imports too: another thread waits while the real __init__ runs;
    # that __init__ itself (the same thread) sees a package being initialised, as in a normal import
    lock = threading.RLock()
    running = False

    def __getattr__(attr: str) -> object:
        nonlocal running
        if not (attr.startswith("__") and attr.endswith("__")) and importlib.util.find_spec(f"{name}.{attr}"):
            # a submodule that is not imported yet (`from pyroute2 import config`): the import system
            # imports it once this says it is no attribute
            raise AttributeError(attr)
        with lock:
            if package.__dict__.get("__getattr__") is __getattr__:
                if running:
                    raise AttributeError(attr)
                running = True
                try:
                    loader.exec_module(package)
                finally:
                    running = False
                if package.__dict__.get("__getattr__") is __getattr__:
                    del package.__dict__["__getattr__"]
        return getattr(package, attr)

    package.__dict__["__getattr__"] = __getattr__
    sys.modules[name] = package


def import_deferred() -> None:
    """Import :data:`DEFERRED` now (benchmarks/startup_imports.py measures them so). A module that fails
    here is left to its first real use, which reports the error where it matters. The daemon does not call
    this from a thread during enrollment: that slowed enrollment down (meshd.daemon, Daemon._main)."""
    for name in DEFERRED:
        try:
            importlib.import_module(name)
        except ImportError:
            continue
