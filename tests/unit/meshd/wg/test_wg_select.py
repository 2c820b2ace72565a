"""Backend choice (meshd.wg.select): the kernel probe link never outlives the probe (netlink faked)."""

from __future__ import annotations

import asyncio

import pytest

from meshd.wg import select
from meshd.wg.errors import BackendUnavailable, InterfaceInUse


class FakeLinks:
    def __init__(self, create_error: Exception | None = None, hang: bool = False) -> None:
        self.links: set[str] = set()
        self.create_error, self.hang = create_error, hang
        self.creating = asyncio.Event()

    async def create_wireguard_link(self, name: str) -> None:
        if self.create_error is not None:
            raise self.create_error
        self.links.add(name)  # the kernel made it ...
        self.creating.set()
        if self.hang:
            await asyncio.Event().wait()  # ... and the answer is late: the stop cancels us here

    async def delete_link(self, name: str) -> None:
        self.links.discard(name)


@pytest.fixture
def links(monkeypatch: pytest.MonkeyPatch) -> FakeLinks:
    fake = FakeLinks()
    monkeypatch.setattr(select.link, "create_wireguard_link", fake.create_wireguard_link)
    monkeypatch.setattr(select.link, "delete_link", fake.delete_link)
    return fake


async def test_probe_link_is_deleted(links: FakeLinks) -> None:
    assert await select.kernel_supported() is True
    assert links.links == set()


@pytest.mark.parametrize(
    ("error", "supported"), [(BackendUnavailable("no"), False), (InterfaceInUse("x"), True)]
)
async def test_probe_answers(links: FakeLinks, error: Exception, supported: bool) -> None:
    links.create_error = error
    assert await select.kernel_supported() is supported


async def test_probe_link_is_deleted_when_a_stop_cancels_the_probe(links: FakeLinks) -> None:
    links.hang = True
    probe = asyncio.create_task(select.kernel_supported())
    await links.creating.wait()
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    assert links.links == set(), "issue 11: a stop during `--wg-backend auto` left a wgprobe link"
