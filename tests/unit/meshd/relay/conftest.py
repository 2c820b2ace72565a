"""Fixtures for the relay client's tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tests.unit.meshd.relay.fakerelay import FakeRelay


@pytest.fixture
async def fake_relay() -> AsyncIterator[FakeRelay]:
    fake = FakeRelay()
    fake.server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    try:
        yield fake
    finally:
        if fake.hold_hello is not None:
            fake.hold_hello.set()
        fake.server.close()
        await fake.server.wait_closed()
