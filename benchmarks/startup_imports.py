"""What `meshd up`'s Python start-up imports, and what it leaves for later (issue 15).

Prints, each in fresh processes (CPU time: user + system, less sensitive than wall time to the load of a
shared machine; p50 and min over ``--runs``):

* ``import meshd.cli, meshd.daemon``: what time_to_direct.py reports as the imports' CPU;
* the same as ``meshd up`` does it: ``meshd.startup.skip_unused_imports()`` between the two (trio
  absent, pyroute2's package ``__init__`` not run);
* ``meshd.startup.DEFERRED``, imported after that: what start-up leaves to the first netlink call, the map
  stream and the first DNS query (or a thread), pyroute2 both lean (as in ``meshd up``) and whole;
* the sum of ``-X importtime`` self times, and the top-level packages imported at start-up.

    PYTHONPATH=. .venv/bin/python benchmarks/startup_imports.py [--runs N]

Compile first (``python -m compileall -q meshd coordinator``), as an installed meshd is.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

CPU = """
import time
t = time.process_time()
import meshd.cli
{skip}
import meshd.daemon
up = time.process_time() - t
from meshd.startup import import_deferred
t = time.process_time()
import_deferred()
print(up, time.process_time() - t)
"""
SKIP = "from meshd.startup import skip_unused_imports; skip_unused_imports()"
PACKAGES = "import sys, meshd.cli, meshd.daemon; print(*sorted({m.split('.')[0] for m in sys.modules}))"
WATCHED = ("dns", "pyroute2", "websockets", "prometheus_client", "trio", "httpx", "typer", "nacl")


def cpu(skip: bool, runs: int) -> tuple[list[float], list[float]]:
    start, later = [], []
    for _ in range(runs):
        code = CPU.format(skip=SKIP if skip else "")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        a, b = r.stdout.split()
        start.append(float(a) * 1000)
        later.append(float(b) * 1000)
    return start, later


def importtime_ms() -> float:
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import meshd.cli, meshd.daemon"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    total = 0
    for line in r.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[0].split(":")[-1].strip().isdigit():
            total += int(parts[0].split(":")[-1])
    return total / 1000


def fmt(values: list[float]) -> str:
    return f"p50 {statistics.median(values):.0f} ms, min {min(values):.0f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    plain, whole = cpu(False, args.runs)
    up, lean = cpu(True, args.runs)
    print(f"import meshd.cli, meshd.daemon, CPU: {fmt(plain)} ({args.runs} runs)")
    print(f"  as `meshd up` does (skip_unused_imports between): {fmt(up)}")
    print(f"imported later (meshd.startup.DEFERRED), CPU: {fmt(lean)} in `meshd up`, {fmt(whole)} otherwise")
    print(f"-X importtime, sum of self times: {importtime_ms():.0f} ms")
    r = subprocess.run([sys.executable, "-c", PACKAGES], capture_output=True, text=True, timeout=60)
    have = set(r.stdout.split())
    print("at start-up: " + ", ".join(f"{p} {'yes' if p in have else 'no'}" for p in WATCHED))


if __name__ == "__main__":
    main()
