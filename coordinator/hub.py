"""Pushes map changes to connected nodes: coalesces for a short window, then one delta per stream.

Each connected stream is a :class:`Subscriber` with an outbound queue; the WebSocket handler drains it.
Long-poll requests wait on :meth:`Hub.wait_for_version`.

Fan-out (issue 16): a delta that leaves a view's members alone is built, signed and encoded as one
WebSocket frame once per (version it starts from, view) and the same bytes are written to every such
stream (server frames are unmasked, RFC 6455 §5.1, so one encoded frame serves every connection). Where
the stream's protocol allows it the frame goes straight to the socket's transport, with no task switch
and no per-stream encoding; per stream there is a dict look-up and one write. Nodes the change touches,
or whose view changed, get a delta signed for them as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from coordinator.mapstate import MapState, PendingDelta
from meshd.proto.netmap import CloseCode

log = logging.getLogger(__name__)

CLOSE = object()  #: put in a subscriber queue to close its stream (with its close_code)
QUEUE_LIMIT = 256
#: bytes a stream's socket may hold unsent before the stream counts as too slow (direct frame writes)
WRITE_BUFFER_LIMIT = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Frame:
    """A server message encoded once as a whole WebSocket text frame (FIN, opcode 1, no mask, no RSV
    bits: valid with or without permessage-deflate), shared by every stream that gets it."""

    text: str
    data: bytes

    @classmethod
    def of(cls, text: str) -> Frame:
        payload = text.encode("utf-8")
        n = len(payload)
        if n < 126:
            head = bytes((0x81, n))
        elif n < 1 << 16:
            head = bytes((0x81, 126)) + n.to_bytes(2, "big")
        else:
            head = bytes((0x81, 127)) + n.to_bytes(8, "big")
        return cls(text, head + payload)


#: writes a frame's bytes straight to a stream's socket; False when the socket is too far behind
RawWriter = Callable[[bytes], bool]
#: Map streams one node may hold at once. meshd keeps one; a few more cover a reconnect that races the
#: old stream's close. Past this the new stream is refused (not the oldest closed): evicting would let two
#: holders of one key (or a reconnect loop) knock each other off forever, each time costing a full map.
MAX_STREAMS_PER_NODE = 4


@dataclass(eq=False)
class Subscriber:
    node_id: int
    version: int
    queue: asyncio.Queue[object] = field(default_factory=lambda: asyncio.Queue(QUEUE_LIMIT))
    close_reason: str = ""
    close_code: CloseCode = CloseCode.REVOKED
    view: str = ""  #: the view token this node was last told (in a node-signed map or delta)
    raw: RawWriter | None = None  #: direct frame writes, when the stream's protocol allows them
    busy: bool = False  #: the send loop is writing an item (a direct write now could overtake it)

    def deliver(self, frame: Frame) -> bool:
        """Send a shared frame: straight to the socket when nothing is queued ahead of it."""
        if self.raw is not None and not self.busy and self.queue.empty():
            return self.raw(frame.data)
        return self.push(frame)

    def push(self, item: object) -> bool:
        try:
            self.queue.put_nowait(item)
            return True
        except asyncio.QueueFull:
            return False

    def close(self, reason: str, code: CloseCode = CloseCode.REVOKED) -> None:
        self.close_reason = reason
        self.close_code = code
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(CLOSE)


class Hub:
    def __init__(
        self, state: MapState, coalesce: float, on_sent: Callable[[int], None] | None = None
    ) -> None:
        self.state = state
        self.coalesce = coalesce
        self.subscribers: dict[int, set[Subscriber]] = {}
        self._wake = asyncio.Event()
        self._due: float | None = None  #: loop time of the next push
        self._cycle: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._on_sent = on_sent
        #: stop() was called: streams closing now leave their node's online flag alone (a graceful stop
        #: saves the flags for the next start, coordinator/presence.py, instead of one write per stream)
        self.stopping = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="map-hub")

    async def stop(self) -> None:
        self.stopping = True
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for subs in list(self.subscribers.values()):
            for sub in subs:
                sub.close("coordinator shutting down", CloseCode.RESTART)

    @property
    def connected(self) -> int:
        return len(self.subscribers)

    def add(self, sub: Subscriber) -> bool:
        """Register `sub`; False (not added) when its node already holds MAX_STREAMS_PER_NODE streams."""
        subs = self.subscribers.setdefault(sub.node_id, set())
        if len(subs) >= MAX_STREAMS_PER_NODE:
            return False
        subs.add(sub)
        return True

    def remove(self, sub: Subscriber) -> bool:
        """Forget `sub`; True when it was that node's last stream."""
        subs = self.subscribers.get(sub.node_id)
        if subs is None:
            return False
        subs.discard(sub)
        if not subs:
            del self.subscribers[sub.node_id]
            return True
        return False

    def send_to(self, node_id: int, message: str) -> bool:
        """Deliver a message (e.g. a signal) to every stream of a node; False when it has none."""
        subs = self.subscribers.get(node_id)
        if not subs:
            return False
        for sub in subs:
            sub.push(message)
        return True

    def disconnect(self, node_id: int, reason: str) -> None:
        for sub in self.subscribers.get(node_id, set()).copy():
            sub.close(reason)

    def delay_for(self, kinds: set[str]) -> float:
        """How long changes of these kinds may wait to be coalesced.

        Map changes (joins, removals, keys, names, policy): `coalesce` (50 ms). Endpoint candidates:
        up to 400 ms. Presence (a node's online flag) alone: up to 2 s, so that a storm of (re)connects
        does not become one push to every node per connect. Anything more urgent cuts a wait short.
        """
        if kinds - {"endpoints", "presence"}:
            return self.coalesce
        if "endpoints" in kinds:
            return max(self.coalesce, 0.4)
        return max(self.coalesce, 2.0)

    def notify(self, delay: float | None = None) -> None:
        """Something changed: push within `delay` seconds (default: the coalescing window)."""
        loop = asyncio.get_running_loop()
        when = loop.time() + (self.coalesce if delay is None else delay)
        if self._due is None or when < self._due:
            self._due = when
            self._wake.set()

    async def wait_for_version(self, since: int, wait: float) -> None:
        """Return when the map version passes `since` (after a push cycle) or after `wait` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while self.state.version <= since:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            if self._cycle is None or self._cycle.done():
                self._cycle = loop.create_future()
            # asyncio.timeout, not wait_for: in 3.11 wait_for can swallow a cancellation that arrives as
            # the awaited thing completes (a long-poll or stop() would then wait on)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await asyncio.shield(self._cycle)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            loop = asyncio.get_running_loop()
            while self._due is not None and (remaining := self._due - loop.time()) > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await self._wake.wait()  # an earlier deadline may arrive
                self._wake.clear()
            self._due = None
            try:
                self.push_all()
            except Exception:  # pragma: no cover - keep the hub alive, the next change retries
                log.exception("map push failed")
            if self._cycle is not None and not self._cycle.done():
                self._cycle.set_result(None)

    def push_all(self) -> None:
        state = self.state
        current = state.version
        peers = state.peers
        #: per `since`: what changed after it, and the nodes it touches (None: everyone, a policy change)
        pendings: dict[int, tuple[PendingDelta | None, frozenset[int] | None]] = {}
        frames: dict[tuple[int, str], Frame] = {}  #: per (`since`, view): the shared delta, encoded
        sent = 0
        for node_id, subs in list(self.subscribers.items()):
            if node_id not in peers:
                for sub in subs:
                    sub.close("node removed or expired")
                continue
            view = state.view_of(node_id)
            for sub in subs:
                since = sub.version
                if since >= current:
                    continue
                entry = pendings.get(since)
                if entry is None:
                    found = state.pending_since(since)
                    touched = None if found is None or found.policy else found.touched
                    entry = pendings[since] = (found, touched)
                pending, touched = entry
                if pending is None:
                    ok = sub.push(state.full_map_message(node_id))
                elif sub.view != view or touched is None or node_id in touched:  # not MapState.shareable
                    ok = sub.push(state.delta_message(pending, node_id))  # signed for this node
                else:
                    frame = frames.get((since, view))
                    if frame is None:
                        frame = frames[since, view] = Frame.of(state.shared_delta_message(pending, node_id))
                    ok = sub.deliver(frame)
                if ok:
                    sub.version = current
                    sub.view = view
                    sent += 1
                else:
                    sub.close("too slow: stream queue full", CloseCode.TOO_SLOW)
        if self._on_sent is not None and sent:
            self._on_sent(sent)
