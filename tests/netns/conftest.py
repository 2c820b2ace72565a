"""Fixtures for namespace integration tests: ``lab`` builds an isolated internet and always tears it down."""

from __future__ import annotations

from collections.abc import Generator, Iterator

import pytest

from tests.netns.lab import Lab
from tests.netns.mesh import Mesh, Node


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


@pytest.fixture
def mesh(lab: Lab) -> Iterator[Mesh]:
    """A mesh on the lab (no coordinator yet): every daemon and the coordinator are stopped at the end."""
    m = Mesh(lab)
    try:
        yield m
    finally:
        m.close()


@pytest.fixture
def pair(lab: Lab, mesh: Mesh) -> tuple[Node, Node]:
    """alpha behind an endpoint-independent NAT, beta on a public address, coordinator on a server; they see
    and ping each other."""
    mesh.start_coordinator(lab.server())
    alpha = mesh.up(lab.host(nat="eim"), "alpha")
    beta = mesh.up(lab.host(nat="public"), "beta")
    mesh.wait_peer(alpha, "beta")
    mesh.wait_peer(beta, "alpha")
    mesh.wait_ping(alpha, beta)
    mesh.wait_ping(beta, alpha)
    return alpha, beta
