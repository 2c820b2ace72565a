"""The kernel fast path's work on its own thread (meshd/relay/forwarderthread.py): an install never holds up
the event loop, work happens in the order asked, counters come from the last read, close comes last."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import cast

import pytest

from meshd.proto.relayport import Allocation, Side
from meshd.relay.forwarderthread import ForwarderThread
from meshd.relay.udpkernel import NftError, NftForwarder


def alloc(port: int) -> Allocation:
    a = Side(b"a" * 32, 1, port, b"s" * 32, addr=("192.0.2.1", 41641))
    b = Side(b"b" * 32, 2, port + 1, b"t" * 32, addr=("192.0.2.2", 41641))
    return Allocation(a, b, created=0.0, active=0.0)


class FakeNft:
    """Records what it was asked, on which thread; an install takes ``install_s`` seconds (nft's
    processes); ``fail`` names a step that raises as nft would."""

    def __init__(self, install_s: float = 0.0, fail: str = "") -> None:
        self.install_s = install_s
        self.fail = fail
        self.done: list[str] = []
        self.threads: set[str] = set()
        self.reads = 0
        self.installed: list[int] = []

    def _step(self, what: str) -> None:
        self.threads.add(threading.current_thread().name)
        if what.split()[0] == self.fail:
            raise NftError(f"{what}: refused")
        self.done.append(what)

    def install(self, a: Allocation) -> None:
        time.sleep(self.install_s)
        self._step(f"install {a.a.port}")

    def remove(self, a: Allocation) -> None:
        self._step(f"remove {a.a.port}")

    def read_all(self) -> dict[int, tuple[int, int, int, int]]:
        self.reads += 1
        return {key: (self.reads, 100, 2, 200) for key in self.installed}

    def close(self) -> None:
        self._step("close")


def threaded(fake: FakeNft, counter_every: float = 2.0) -> ForwarderThread:
    return ForwarderThread(cast(NftForwarder, fake), counter_every=counter_every)


async def test_an_install_does_not_hold_up_the_event_loop() -> None:
    fake = FakeNft(install_s=0.3)
    ft = threaded(fake)
    finished = threading.Event()
    t = time.monotonic()
    ft.install(alloc(40000), finished.set)
    assert time.monotonic() - t < 0.05, "the caller goes on at once"
    ticks = 0
    while not finished.is_set():  # the loop keeps running while nft works
        await asyncio.sleep(0.01)
        ticks += 1
    assert ticks >= 10
    assert fake.done == ["install 40000"]
    assert fake.threads and threading.current_thread().name not in fake.threads
    ft.close()


def test_work_happens_in_the_order_it_was_asked() -> None:
    fake = FakeNft(install_s=0.02)
    ft = threaded(fake)
    one, two = alloc(40000), alloc(40002)
    ft.install(one, lambda: None)
    ft.remove(one)
    ft.install(two, lambda: None)
    ft.install(one, lambda: None)
    ft.close()
    assert fake.done == ["install 40000", "remove 40000", "install 40002", "install 40000", "close"]


def test_a_refused_install_is_logged_and_still_done(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeNft(fail="install")
    ft = threaded(fake)
    finished = threading.Event()
    with caplog.at_level(logging.WARNING, logger="meshd.relay.ports"):
        ft.install(alloc(40000), finished.set)
        ft.remove(alloc(40000))
        ft.drain()
    assert finished.is_set(), "the port server learns it is over (the pair stays in userspace)"
    assert fake.done == ["remove 40000"], "and the work after it goes on"
    assert "kernel forwarding not installed: install 40000: refused" in caplog.text
    ft.close()


def test_counters_come_from_the_last_read_and_reads_are_spaced() -> None:
    fake = FakeNft()
    ft = threaded(fake, counter_every=0.2)
    one = alloc(40000)
    fake.installed = [id(one)]
    try:
        ft.counters(one)  # queues a read (the caller does not wait for it)
        ft.drain()
        assert ft.counters(one) == (1, 100, 2, 200)
        assert fake.reads == 1, "no second read within counter_every"
        time.sleep(0.25)
        ft.counters(one)
        ft.drain()
        assert fake.reads == 2 and ft.counters(one) == (2, 100, 2, 200)
        ft.remove(one)
        ft.drain()
        assert ft.counters(one) is None, "a removed pair has no counters"
    finally:
        ft.close()


def test_nothing_runs_after_close_and_an_install_asked_then_is_done_at_once() -> None:
    fake = FakeNft()
    ft = threaded(fake)
    ft.install(alloc(40000), lambda: None)
    ft.close()
    finished = threading.Event()
    ft.install(alloc(40002), finished.set)
    ft.remove(alloc(40000))
    assert finished.is_set()
    assert ft.counters(alloc(40000)) is None
    ft.close()  # twice is harmless
    assert fake.done == ["install 40000", "close"]
