"""Hostile tests that need the namespace lab use its fixtures (and its failure report hook)."""

from tests.netns.conftest import lab, mesh, pytest_runtest_makereport  # noqa: F401
