"""Fixtures for namespace integration tests: ``lab`` builds an isolated internet and always tears it down."""

from __future__ import annotations

from collections.abc import Generator, Iterator

import pytest

from tests.netns.lab import Lab


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, object, None]:
    """Remember each phase's report on the item so fixtures can tell whether the test failed."""
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """A fresh lab (function-scoped). On failure its routers' nft/conntrack state and miniupnpd logs are
    printed (shown under "Captured stdout teardown")."""
    with Lab() as the_lab:
        yield the_lab
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(the_lab.dump())
