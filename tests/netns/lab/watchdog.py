"""Lab watchdog: deletes a lab's namespaces if the process that built it dies without closing it.

    python watchdog.py OWNER TMPDIR

Started by :class:`~tests.netns.lab.Lab` in its own session with a pipe on stdin; it blocks reading stdin.
EOF means the lab was closed (then nothing is left to do) or its process died, even by SIGKILL: then it kills
every process in the ``mlab-<OWNER>-*`` namespaces, deletes them and removes TMPDIR. Bounded: each namespace
costs at most a couple of seconds.
"""

from __future__ import annotations

import shutil
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from tests.netns.lab.netns import LOCK_DIR, PREFIX, delete_namespace, list_namespaces


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: watchdog.py OWNER TMPDIR", file=sys.stderr)
        return 2
    owner, tmpdir = argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the test run must not stop cleanup
    sys.stdin.buffer.read()
    for name in list_namespaces(f"{PREFIX}{owner}-"):
        delete_namespace(name)
    shutil.rmtree(tmpdir, ignore_errors=True)
    (LOCK_DIR / f"{owner}.lock").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
