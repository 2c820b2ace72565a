"""The kernel fast path's work on its own thread (meshd/relay/forwarderthread.py): an install never holds up
the event loop, installs happen in the order asked, a removal happens at once and drops a queued install
of its pair, counters come from the last read, close comes last."""

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
    processes); ``fail`` names the step that raises as nft would."""

    def __init__(self, install_s: float = 0.0, fail: str = "") -> None:
        self.install_s = install_s
        self.fail = fail
        self.done: list[str] = []
        self.threads: set[str] = set()
        self.reads = 0
        self.installed: list[int] = []

    def _step(self, what: str) -> None:
        self.threads.add(threading.current_thread().name)
        if what == self.fail:
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


class GatedNft(FakeNft):
    """The first install waits until ``release`` is set: the worker is busy with it meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.started = threading.Event()

    def install(self, a: Allocation) -> None:
        if not self.started.is_set():
            self.started.set()
            self.release.wait(10)
        super().install(a)


def test_installs_happen_in_the_order_they_were_asked() -> None:
    fake = FakeNft(install_s=0.02)
    ft = threaded(fake)
    for port in (40000, 40002, 40004):
        ft.install(alloc(port), lambda: None)
    ft.close()
    assert fake.done == ["install 40000", "install 40002", "install 40004", "close"]


def test_a_removal_happens_now_and_drops_a_queued_install_of_its_pair() -> None:
    """A removed node's traffic must stop at once; an install still queued for the pair must not bring
    its forwarding back afterwards."""
    fake = FakeNft()
    ft = threaded(fake)
    gone, other = alloc(40002), alloc(40004)
    blocker = threading.Event()
    ft._pool.submit(blocker.wait, 10)  # the worker is busy elsewhere (white box: holds no nft step)
    finished = threading.Event()
    ft.install(gone, finished.set)
    ft.install(other, lambda: None)
    ft.remove(gone)
    assert fake.done == ["remove 40002"], "at once, not behind the queue"
    blocker.set()
    ft.drain()
    assert fake.done == ["remove 40002", "install 40004"], "the queued install of the removed pair is dropped"
    assert finished.is_set(), "and still reported done"
    ft.install(gone, lambda: None)  # a later install of that pair (or of a new one with its id) runs
    ft.close()
    assert fake.done[-2:] == ["install 40002", "close"]


def test_a_removal_waits_for_the_step_under_way_and_comes_last() -> None:
    fake = GatedNft()
    ft = threaded(fake)
    ft.install(alloc(40000), lambda: None)
    assert fake.started.wait(5)
    pair = alloc(40002)
    ft.install(pair, lambda: None)
    removing = threading.Thread(target=ft.remove, args=(pair,))
    removing.start()
    removing.join(0.2)
    assert removing.is_alive(), "one nft user at a time"
    fake.release.set()
    removing.join(5)
    ft.drain()
    ft.close()
    steps = [d for d in fake.done if d.endswith("40002")]
    assert steps in (["remove 40002"], ["install 40002", "remove 40002"]), "nothing of the pair outlives it"


def test_a_refused_install_is_logged_and_still_done(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeNft(fail="install 40000")
    ft = threaded(fake)
    finished = threading.Event()
    with caplog.at_level(logging.WARNING, logger="meshd.relay.ports"):
        ft.install(alloc(40000), finished.set)
        ft.drain()
        ft.install(alloc(40002), lambda: None)
        ft.drain()
    assert finished.is_set(), "the port server learns it is over (the pair stays in userspace)"
    assert fake.done == ["install 40002"], "and the work after it goes on"
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
    assert finished.is_set()
    assert ft.counters(alloc(40000)) is None
    ft.close()  # twice is harmless
    assert fake.done == ["install 40000", "close"]
