"""No ``asyncio.wait_for`` in the programs.

On Python 3.11 ``wait_for`` swallows a cancellation that arrives together with the awaited result (bpo-42130,
fixed in 3.12): the task runs on after it was cancelled, and whoever awaits it hangs. It hung meshd's stop
(issue 11) and, in CI, a coordinator replica's stop (its NOTIFY listener woke as stop() cancelled it).
``asyncio.timeout`` keeps the cancellation; ``meshd.nat.mapper.wait_set`` wraps the event case."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def wait_for_calls(source: str) -> list[int]:
    tree = ast.parse(source)
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "wait_for"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "asyncio"
    ]


def test_the_programs_never_call_asyncio_wait_for() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{line}"
        for package in ("meshd", "coordinator")
        for path in sorted((ROOT / package).rglob("*.py"))
        for line in wait_for_calls(path.read_text())
    ]
    assert found == [], "use asyncio.timeout (wait_for loses cancellations on 3.11)"


def test_the_check_finds_a_call_and_ignores_text() -> None:
    source = '"""asyncio.wait_for(x) in a docstring"""\nasync def f():\n    await asyncio.wait_for(x, 1)\n'
    assert wait_for_calls(source) == [3]
