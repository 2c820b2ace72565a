"""Suite-wide pytest configuration."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

# Input-generation speed is the machine's load, not a property of the parsers: the suite runs on 2 shared
# cores next to netns labs, where a slow draw failed the health check with nothing wrong. Deadlines stay off
# for the same reason; every other health check (and the example counts) stays as Hypothesis sets it.
settings.register_profile("suite", suppress_health_check=[HealthCheck.too_slow], deadline=None)
settings.load_profile("suite")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Integration tests need root; say so loudly instead of failing in odd ways."""
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root: network namespaces / microVM (run scripts/test as root)")
    for item in items:
        if "netns" in item.keywords or "microvm" in item.keywords:
            item.add_marker(skip)
