"""docs/security.md points at the tests that show each claim: every such reference must exist, so that the
threat model cannot rot when a test is renamed, moved or deleted (issue 12).

The doc writes test paths relative to ``tests/`` in backticks, ``hostile/test_x.py::test_name``, and
further tests of the same file on that line as ``::other_name``; a bare ``unit/.../test_{a,b}.py`` names
files. Code paths (``coordinator/db/engine.py``) must exist from the repository root. A test function is
found by its ``def`` line (sync or async; a class by its ``class`` line), which is what pytest collects.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "security.md"

_SPAN = re.compile(r"`([^`\n]+)`")
_REF = re.compile(r"(?P<file>[\w/{},.-]+\.py)?(?P<names>(?:::[\w\[\]-]+)+)?")
_BRACES = re.compile(r"\{([^{}]*)\}")


def _expand(path: str) -> list[str]:
    """``test_{a,b}.py`` -> ``test_a.py``, ``test_b.py`` (the doc's shorthand for sibling files)."""
    parts = _BRACES.split(path)
    choices = [p.split(",") if i % 2 else [p] for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def _is_test_file(path: str) -> bool:
    return Path(path).name.startswith(("test_", "conftest")) or path.startswith(("tests/", "hostile/"))


def _defines(source: str, name: str) -> bool:
    return re.search(rf"^\s*(?:async\s+def|def|class)\s+{re.escape(name)}\b", source, re.M) is not None


def problems(text: str, root: Path = ROOT) -> tuple[list[str], int]:
    """Every reference in `text` that does not exist, and how many test references were checked."""
    found: list[str] = []
    checked = 0
    for lineno, line in enumerate(text.splitlines(), 1):
        current: Path | None = None  # the test file a following ``::name`` belongs to
        for span in _SPAN.findall(line):
            m = _REF.fullmatch(span.strip())
            if m is None or not (m["file"] or m["names"]):
                continue
            if m["file"]:
                rel = m["file"]
                if not _is_test_file(rel):  # a code path: from the repository root
                    if m["names"] is None and "/" in rel and not (root / rel).exists():
                        found.append(f"line {lineno}: {rel} does not exist")
                    continue
                rel = rel.removeprefix("tests/")
                paths = [root / "tests" / p for p in _expand(rel)]
                for p in paths:
                    if not p.is_file():
                        found.append(f"line {lineno}: tests/{p.relative_to(root / 'tests')} does not exist")
                current = paths[0] if len(paths) == 1 else None
                checked += len(paths)
            if m["names"]:
                if current is None:
                    found.append(f"line {lineno}: {span} names a test but no single test file precedes it")
                    continue
                source = current.read_text() if current.is_file() else ""
                for name in m["names"].split("::")[1:]:
                    checked += 1
                    if not _defines(source, name.split("[", 1)[0]):
                        found.append(f"line {lineno}: {current.relative_to(root)}::{name} does not exist")
    return found, checked


def test_every_test_the_threat_model_names_exists() -> None:
    missing, checked = problems(DOC.read_text())
    assert not missing, "\n".join(missing)
    assert checked >= 100, checked  # the parser still finds the doc's references


def test_the_check_catches_a_missing_test_a_missing_file_and_a_dangling_name() -> None:
    text = "\n".join(
        [
            "| a | `hostile/test_signals.py::test_no_such_test`, `::test_a_hidden_node_never_gets_signals"
            "_and_looks_like_a_node_that_does_not_exist` |",
            "| b | `hostile/test_gone.py::test_x` |",
            "| c | `::test_orphan` |",
            "| d | `unit/meshd/proto/test_{stun,nothere}.py` |",
            "| e | `coordinator/no_such_module.py` `handle` |",
            "| ok | `unit/test_security_doc.py::test_every_test_the_threat_model_names_exists`,"
            " `coordinator/db/engine.py` |",
        ]
    )
    missing, _ = problems(text)
    assert [m.split(":")[0] for m in missing] == ["line 1", "line 2", "line 2", "line 3", "line 4", "line 5"]
    assert "test_no_such_test" in missing[0] and "test_gone.py does not exist" in missing[1]
    assert "test_nothere.py" in missing[4] and "no_such_module.py" in missing[5]
