"""No class in meshd/ grows past 300 lines (issue 11): a class that big holds several jobs, and the next
feature should go into a module of its own rather than tip it over silently."""

from __future__ import annotations

import ast
from pathlib import Path

import meshd

LIMIT = 300


def _classes() -> list[tuple[int, str]]:
    root = Path(meshd.__file__).parent
    out = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                assert node.end_lineno is not None
                lines = node.end_lineno - node.lineno + 1
                out.append((lines, f"{path.relative_to(root.parent)}:{node.lineno} {node.name}"))
    return out


def test_the_walk_sees_the_daemon() -> None:
    assert any(where.endswith(" Daemon") for _, where in _classes()), "the walk found meshd's classes"


def test_no_class_in_meshd_is_over_300_lines() -> None:
    big = sorted((n, where) for n, where in _classes() if n > LIMIT)
    assert not big, "split by responsibility: " + ", ".join(f"{where} ({n} lines)" for n, where in big)
