"""Group commit: write units from concurrent callers share one transaction and one fsync (issue 16).

Enrollment is two small write transactions (the challenge, then the registration), each serialised by the
coordinator's write lock and ended by a synchronous commit (SQLite ``synchronous=FULL``: an fsync of the
WAL, ~6 ms on this machine's disk). Under a burst of enrollments the lock and the fsyncs, not the work,
set the rate. Here callers queue a *unit* (an async function of the transaction) and one worker runs every
unit waiting at that moment, in order, inside one :meth:`Core.transaction`: one lock, one BEGIN, one fsync
for all of them, and each caller still gets its own result or exception.

Isolation. A unit that raises must leave no trace and must cost the others nothing; SQLite savepoints do
not mix with the driver's implicit transactions, so instead the whole shared transaction is rolled back
(its ``on_rollback`` hooks undo in-memory reservations such as addresses), the failing unit runs again
alone, in a transaction of its own, and its outcome (usually the same exception) goes to its caller; the
units that had not failed run again as a new group. A unit's writes are therefore committed only together
with its own success, and each unit sees exactly the database state a serial execution in some order would
give it (the group's earlier units' writes, flushed in the same session). A failed commit (the database
itself) retries every unit of the group alone.

Units must be safe to run twice up to their commit: all their effects go through the transaction
(database rows, ``on_commit``/``on_rollback`` hooks), never straight into shared memory.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import event

from coordinator.core import Core, Tx

log = logging.getLogger(__name__)
T = TypeVar("T")

#: units in one shared transaction at most (bounds the lock hold and the work redone after a failure)
MAX_GROUP = 64

Unit = Callable[[Tx], Awaitable[Any]]
#: look-ups many units of a group need, done once for all of them at the start of the shared transaction
#: (called with the items of every waiting unit that named the same function); units run alone get none
Prepare = Callable[[Tx, list[Any]], Awaitable[None]]


@dataclass
class _Waiting:
    unit: Unit
    prepare: tuple[Prepare, Any] | None = None
    done: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class _UnitFailed(Exception):
    """Aborts the shared transaction: unit `index` raised."""

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.index = index


class GroupCommit:
    """The group-commit queue of one core (see the module docstring)."""

    def __init__(self, core: Core, max_group: int = MAX_GROUP) -> None:
        self.core = core
        self.max_group = max_group
        self._queue: deque[_Waiting] = deque()
        self._worker: asyncio.Task[None] | None = None
        self.groups = 0  #: shared transactions committed (tests and benchmarks read it)
        self.largest = 0  #: units in the largest group committed
        self.alone = 0  #: units run in a transaction of their own (a group of one, or after a failure)
        self.failed = 0  #: units that raised inside a group (each then ran alone)

    async def run(self, unit: Callable[[Tx], Awaitable[T]], prepare: tuple[Prepare, Any] | None = None) -> T:
        """Run `unit` in a transaction shared with the other units waiting now; its result or exception.

        `prepare` = (function, item): in a shared transaction, before any unit runs, each distinct function
        is awaited once with the items of all the group's units that gave it (batched look-ups; the unit
        finds their answers in ``tx.session.info`` and must work without them, as it runs alone)."""
        waiting = _Waiting(unit, prepare)
        # a caller that went away (cancelled) leaves its outcome unread: read it here, no warning
        waiting.done.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._queue.append(waiting)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain(), name="group-commit")
        result: T = await asyncio.shield(waiting.done)  # a caller that goes away does not undo its unit
        return result

    async def _drain(self) -> None:
        try:
            while self._queue:
                group = [self._queue.popleft() for _ in range(min(self.max_group, len(self._queue)))]
                await self._commit(group)
        finally:  # cancelled (shutdown) or a bug: no caller may wait forever
            for w in self._queue:
                if not w.done.done():
                    w.done.set_exception(RuntimeError("the coordinator is stopping"))
            self._queue.clear()

    async def _commit(self, group: list[_Waiting]) -> None:
        while group:
            if len(group) == 1:
                await self._alone(group[0])
                return
            results: list[Any] = []
            try:
                async with self.core.transaction() as tx:
                    _hold_rows(tx, [])
                    batches: dict[Prepare, list[Any]] = {}
                    for w in group:
                        if w.prepare is not None:
                            batches.setdefault(w.prepare[0], []).append(w.prepare[1])
                    for prepare, items in batches.items():
                        await prepare(tx, items)
                    for i, w in enumerate(group):
                        try:
                            results.append(await w.unit(tx))
                        except Exception as exc:
                            raise _UnitFailed(i) from exc
            except _UnitFailed as failed:
                self.failed += 1
                # rolled back: run the failing unit alone (its own outcome), then the rest again
                await self._alone(group[failed.index])
                group = group[: failed.index] + group[failed.index + 1 :]
                continue
            except Exception:
                log.warning("a shared transaction of %d units failed; running each alone", len(group))
                for w in group:
                    await self._alone(w)
                return
            except BaseException:
                for w in group:
                    if not w.done.done():
                        w.done.set_exception(RuntimeError("the coordinator is stopping"))
                raise
            self.groups += 1
            self.largest = max(self.largest, len(group))
            for w, result in zip(group, results, strict=True):
                if not w.done.done():
                    w.done.set_result(result)
            return

    async def _alone(self, w: _Waiting) -> None:
        self.alone += 1
        try:
            async with self.core.transaction() as tx:
                result = await w.unit(tx)
        except Exception as exc:
            if not w.done.done():
                w.done.set_exception(exc)
            return
        except BaseException:
            if not w.done.done():
                w.done.set_exception(RuntimeError("the coordinator is stopping"))
            raise
        if not w.done.done():
            w.done.set_result(result)


def _hold_rows(tx: Tx, held: list[object]) -> None:
    """Keep every row the group's session loads or writes alive until the group ends. The identity map
    holds clean rows weakly: without this the rows every unit reads (the audit head, the certificate
    serial, the key's owner) are dropped after each flush and read again by the next unit."""
    sync = tx.session.sync_session
    event.listen(sync, "loaded_as_persistent", lambda _s, row: held.append(row))
    event.listen(sync, "pending_to_persistent", lambda _s, row: held.append(row))


_groups: weakref.WeakKeyDictionary[Core, GroupCommit] = weakref.WeakKeyDictionary()


def of(core: Core) -> GroupCommit:
    """The group-commit queue of `core` (one per core: tests build several)."""
    group = _groups.get(core)
    if group is None:
        group = _groups[core] = GroupCommit(core)
    return group
