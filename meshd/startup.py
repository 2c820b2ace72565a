"""What the daemon's process start-up can skip (issue 15: first ping sooner).

httpcore (under httpx, which talks to the coordinator) imports trio whenever it is installed, to find
out at run time whether it runs under trio or asyncio. meshd runs asyncio only, and trio is no
dependency of ours, but where another package pulled it in (Selenium does, on this test machine)
importing it costs ~40-70 ms of CPU before the first request to the coordinator: a quarter of the time
from ``starting`` to ``enrolled``. The ``meshd up`` process marks it as absent, which is what httpcore
is written for (``trio = None`` on ImportError). Only that process: a test or tool that imports meshd
next to its own trio code is left alone.
"""

from __future__ import annotations

import sys

#: optional imports of our dependencies that the daemon never uses
UNUSED = ("trio",)


def skip_unused_imports() -> None:
    """Make ``import trio`` (and the like) fail fast in this process, unless already imported."""
    for name in UNUSED:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]
