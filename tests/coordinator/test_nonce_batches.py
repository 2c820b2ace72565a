"""Nonces of signed requests are stored by group commit (issue 16): a burst of handshakes costs one
transaction per batch, and a replay is still refused, inside one batch or across batches."""

from __future__ import annotations

import asyncio
import time

from coordinator.api import auth
from meshd.proto import signing
from tests.coordinator.conftest import Coord


def envelope(node: str, nonce: str) -> signing.SignedHeaders:
    return signing.SignedHeaders(node, int(time.time()), nonce, b"\x00" * 64)


async def test_a_burst_is_one_transaction_and_every_replay_is_refused(coord: Coord) -> None:
    core = coord.core
    transactions = 0
    real = core.transaction

    def counting() -> object:
        nonlocal transactions
        transactions += 1
        return real()

    core.transaction = counting  # type: ignore[method-assign]
    try:
        burst = [auth.remember_nonce(core, "n", envelope("1", f"{i:032x}")) for i in range(50)]
        burst.append(auth.remember_nonce(core, "n", envelope("1", f"{7:032x}")))  # replay inside the burst
        results = await asyncio.gather(*burst, return_exceptions=True)
        refused = [r for r in results if isinstance(r, auth.Unauthorized)]
        assert len(refused) == 1 and "replayed" in str(refused[0])
        assert all(r is None for r in results[:50])
        assert transactions <= 2, transactions  # the first alone, the other 49 waiting behind it together
        again = await asyncio.gather(
            *(auth.remember_nonce(core, "n", envelope("1", f"{i:032x}")) for i in (3, 60)),
            return_exceptions=True,
        )  # a replay of a stored nonce in a later batch, and a fresh one beside it
        assert isinstance(again[0], auth.Unauthorized) and again[1] is None
    finally:
        core.transaction = real  # type: ignore[method-assign]
