"""Suite-wide pytest configuration."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Integration tests need root; say so loudly instead of failing in odd ways."""
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root: network namespaces / microVM (run scripts/test as root)")
    for item in items:
        if "netns" in item.keywords or "microvm" in item.keywords:
            item.add_marker(skip)
