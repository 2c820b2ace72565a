"""The map stream: one WebSocket per node. Full map (or the missed delta) on connect, then deltas.

Handshake: ``GET /api/v1/stream?proto=2&since=V`` signed like every node request; ``proto`` names the map
format (netmap.MAP_FORMAT), and a stream without it is closed with OUTDATED (4426, "upgrade meshd").
A long message (a full map) comes as a binary frame of its zlib-compressed text. The server sends
``map``/``delta``/``signal``/``error`` messages (maps and deltas signed for the node: meshd verifies
them before use); the node sends ``endpoints`` and ``signal`` messages (format: meshd.proto.netmap).

Close codes (:class:`meshd.proto.netmap.CloseCode`): REVOKED (4403) the node was removed or expired (also
sent instead of accepting, as HTTP 403, when a revoked node connects); POLICY (1008) the handshake
signature was refused; RESTART (1012) the coordinator is restarting; TOO_SLOW (4408) the node fell behind
(its queue filled); TOO_MANY_STREAMS (1013) the node has MAX_STREAMS_PER_NODE open already. After
RESTART/TOO_SLOW/network loss, reconnect with ``since=<last version>`` to receive only what was missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import weakref
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from coordinator import nodes
from coordinator.api.auth import authenticate_node
from coordinator.core import Core
from coordinator.errors import CoordinatorError
from coordinator.hub import CLOSE, MAX_STREAMS_PER_NODE, WRITE_BUFFER_LIMIT, Frame, RawWriter, Subscriber
from coordinator.mapstate import MapState, PendingDelta
from coordinator.ratelimit import TokenBuckets
from meshd.proto import netmap
from meshd.proto.netmap import CloseCode

router = APIRouter(tags=["stream"])
log = logging.getLogger(__name__)


#: Signals (call-me-maybe) per sender node: a token bucket of SIGNAL_RATE per second with bursts of
#: SIGNAL_BURST. A node sends one per peer and path attempt (a few per second while paths upgrade); a
#: flood would cost the coordinator a queue push and a target's stream per signal.
SIGNAL_RATE = 20.0
SIGNAL_BURST = 40.0
#: why a stream that did not ask for this map format is closed (CloseCode.OUTDATED; meshd logs it)
OUTDATED_REASON = f"meshd too old: this coordinator sends map format {netmap.MAP_FORMAT}; upgrade meshd"
#: messages at least this long are compressed off the event loop (_send)
COMPRESS_IN_THREAD_AT = 256 * 1024
MAX_SIGNAL = 8192  #: bytes of the encoded signal message (docs/design.md §2.1: ≤ 8 KiB)
#: per-sender signal buckets, per core (tests build several)
_signal_buckets: weakref.WeakKeyDictionary[Core, TokenBuckets[int]] = weakref.WeakKeyDictionary()
#: Admission control: full maps built and sent at once. A full map is O(N) (megabytes at 10,000 nodes);
#: after a restart thousands of streams may ask for one together. Each waits for a slot, builds its map
#: in it and keeps it until the socket has taken the bytes, so at most this many are in memory at once.
#: Resuming streams (a delta since V) do not wait.
FULL_MAP_SLOTS = 8
_full_map_slots: weakref.WeakKeyDictionary[Core, asyncio.Semaphore] = weakref.WeakKeyDictionary()


def _signal_allowed(core: Core, node_id: int) -> bool:
    buckets = _signal_buckets.setdefault(core, TokenBuckets(SIGNAL_RATE, SIGNAL_BURST))
    return buckets.allow(node_id, time.monotonic())


async def handle_client_message(core: Core, node_id: int, msg: netmap.ClientMessage) -> str | None:
    """Apply one message from a node; returns an error message to send back, if any."""
    if isinstance(msg, netmap.EndpointsMessage):
        await nodes.set_endpoints(core, node_id, msg.candidates, None)
        return None
    if not _signal_allowed(core, node_id):
        return netmap.encode_server_message(netmap.ErrorMessage("signal: rate limit (20/s) exceeded"))
    if len(netmap.encode_client_message(msg)) > MAX_SIGNAL:
        return netmap.encode_server_message(netmap.ErrorMessage("signal: payload larger than 8 KiB"))
    # only to a node the sender's map shows (the policy's visibility, as maps are filtered); a hidden
    # node gets the same answer as a node id that does not exist, so the error is no existence oracle
    seen = core.state.compiled.visible(node_id)
    if msg.peer == node_id or msg.peer not in core.state.peers or (seen is not None and msg.peer not in seen):
        return netmap.encode_server_message(netmap.ErrorMessage(f"signal: unknown peer {msg.peer}"))
    forwarded = netmap.encode_server_message(netmap.SignalMessage(node_id, msg.payload))
    if core.hub.send_to(msg.peer, forwarded):
        return None
    peer = core.state.peers.get(msg.peer)
    if (
        core.presence is not None
        and peer is not None
        and peer.online
        and await core.forward_signal(msg.peer, forwarded)
    ):
        return None  # the peer streams to another replica (issue 16): it delivers
    return netmap.encode_server_message(netmap.ErrorMessage(f"signal: peer {msg.peer} is not connected"))


@router.websocket("/api/v1/stream")
async def stream(ws: WebSocket) -> None:
    core: Core = ws.app.state.core
    try:
        node_id = await authenticate_node(core, ws.headers, "GET", ws.url, b"")
    except CoordinatorError as exc:
        await ws.close(code=CloseCode.POLICY, reason=exc.message[:120])
        return
    if node_id not in core.state.peers:
        await ws.close(code=CloseCode.REVOKED, reason="node removed or expired")
        return
    if ws.query_params.get("proto") != str(netmap.MAP_FORMAT):
        await ws.accept()
        await ws.close(code=CloseCode.OUTDATED, reason=OUTDATED_REASON)
        return
    since_text = ws.query_params.get("since")
    since = int(since_text) if since_text and since_text.isdigit() and len(since_text) < 19 else None
    state = core.state
    # the slot is taken before any await, so that concurrent opens cannot all pass the count; the version
    # stays "ahead" until the first map is queued, so the hub pushes no delta before it
    sub = Subscriber(node_id=node_id, version=2**62)
    if not core.hub.add(sub):
        await ws.accept()
        await ws.close(
            code=CloseCode.TOO_MANY_STREAMS,
            reason=f"too many map streams for this node (at most {MAX_STREAMS_PER_NODE})",
        )
        return
    sender: asyncio.Task[None] | None = None
    try:
        await ws.accept()
        pending, frames = _resumption(core, since) if since is not None else (None, {})
        if pending is not None:
            # the relay map always comes along, shared or not: a node failing over from another replica
            # (issue 16) holds that replica's relay map, whose embedded relay is gone with it
            pending = dataclasses.replace(pending, relays=True)
        if pending is None:
            async with _full_map_slots.setdefault(core, asyncio.Semaphore(FULL_MAP_SLOTS)):
                await _send_first(ws, sub, state, None)
        elif state.shareable(pending, node_id) and not _touched_since(state, pending, node_id):
            await _send_shared_first(ws, sub, state, pending, frames)
            if sub.version < state.version:
                core.hub.notify()  # the changes after the cached entry go with the next push
        else:
            await _send_first(ws, sub, state, pending)
        sub.raw = raw_writer(ws)  # from now on shared frames may go straight to the socket
        core.metrics.connected.set(core.hub.connected)
        sender = asyncio.create_task(_send_loop(ws, sub))
        await nodes.set_endpoints(core, node_id, None, True)
        await _receive_loop(ws, core, node_id, sub)
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        if sender is not None:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender
        last = core.hub.remove(sub)
        core.metrics.connected.set(core.hub.connected)
        if last and not core.hub.stopping:
            with contextlib.suppress(Exception):
                await nodes.set_endpoints(core, node_id, None, False)
        if sub.close_reason:
            with contextlib.suppress(Exception):
                await ws.close(code=sub.close_code, reason=sub.close_reason[:120])


#: Resumptions (issue 16): per core, when the cache was started and, per `since`, what changed after it
#: (up to the version current when it was built) and the delta frames shared by views. A storm of streams
#: resuming from the same few versions (after a restart, or a connect storm) costs a dict look-up and one
#: write each instead of a delta built and signed per node. An entry may lag the current version by up to
#: RESUMPTION_TTL: the stream's version is then the entry's and the hub sends it the rest with everyone's.
_resumptions: weakref.WeakKeyDictionary[
    Core, tuple[float, dict[int, tuple[PendingDelta | None, dict[str, Frame]]]]
] = weakref.WeakKeyDictionary()
RESUMPTION_TTL = 1.0  #: seconds a cached resumption serves (map versions change with every connect)
RESUMPTIONS_KEPT = 256  #: distinct `since` values cached at once (each may hold a frame per view)


def _resumption(core: Core, since: int) -> tuple[PendingDelta | None, dict[str, Frame]]:
    """What changed after `since` (None: a full map is needed) and the shared frames built for it."""
    now = time.monotonic()
    cached = _resumptions.get(core)
    if cached is None or now - cached[0] > RESUMPTION_TTL or len(cached[1]) >= RESUMPTIONS_KEPT:
        cached = _resumptions[core] = (now, {})
    entry = cached[1].get(since)
    if entry is None:
        entry = cached[1][since] = (core.state.pending_since(since), {})
    return entry


def _touched_since(state: MapState, pending: PendingDelta, node_id: int) -> bool:
    """Whether the node or the policy changed after the cached `pending` was built (then its view may
    differ from the one the shared frame would be signed for: it gets a delta signed for itself)."""
    if pending.version == state.version:
        return False
    key = (pending.version, state.version)
    newer = _newer.get(state)
    if newer is None or newer[0] != key:
        later = state.pending_since(pending.version)
        newer = _newer[state] = (key, None if later is None or later.policy else later.touched)
    return newer[1] is None or node_id in newer[1]


#: per map state: (cached version, current version) -> the nodes changed in between (None: the policy)
_newer: weakref.WeakKeyDictionary[MapState, tuple[tuple[int, int], frozenset[int] | None]] = (
    weakref.WeakKeyDictionary()
)


async def _send_shared_first(
    ws: WebSocket, sub: Subscriber, state: MapState, pending: PendingDelta, frames: dict[str, Frame]
) -> None:
    """Send a resuming stream the delta its view shares (:meth:`MapState.shareable`: the change leaves
    the node and the policy alone, so the node's view is the one it held at `since`; meshd checks the
    view signature against the map it holds). Built once per (version, since, view)."""
    view = state.view_of(sub.node_id)
    frame = frames.get(view)
    if frame is None:
        frame = frames[view] = Frame.of(state.shared_delta_message(pending, sub.node_id))
    sub.version, sub.view = pending.version, view  # the hub sends what changed after pending.version
    raw = raw_writer(ws)
    if raw is None or not raw(frame.data):
        await ws.send_text(frame.text)


async def _send_first(ws: WebSocket, sub: Subscriber, state: MapState, pending: PendingDelta | None) -> None:
    """Build and send the stream's first message (node-signed) and wait until the socket took it.

    The subscriber's version is set in the same step as the build, so the hub queues every later change
    behind it (the send loop starts after this)."""
    node_id = sub.node_id
    first = state.full_map_message(node_id) if pending is None else state.delta_message(pending, node_id)
    sub.version = state.version
    sub.view = state.view_of(node_id)  # node-signed messages carry the node's view token
    await _send(ws, first)
    del first  # a full map can be megabytes: no reference once it is written
    writable = getattr(getattr(getattr(ws, "_send", None), "__self__", None), "writable", None)
    if isinstance(writable, asyncio.Event):
        await writable.wait()  # the transport drained below its high-water mark


def raw_writer(ws: WebSocket) -> RawWriter | None:
    """Direct frame writes to the socket under uvicorn's websockets-sansio protocol (the default
    `websocket_impl`): it writes every message whole and synchronously to its transport, so a frame
    written between two of its messages cannot split one. None for other implementations (the send loop
    then sends the frame's text as a message)."""
    proto = getattr(getattr(ws, "_send", None), "__self__", None)
    if type(proto).__name__ != "WebSocketsSansIOProtocol":
        return None
    transport: Any = getattr(proto, "transport", None)
    # duck-typed: uvloop's transports do not subclass asyncio.WriteTransport
    if not callable(getattr(transport, "write", None)) or not hasattr(transport, "get_write_buffer_size"):
        return None

    def write(data: bytes) -> bool:
        if getattr(proto, "close_sent", True) or transport.is_closing():
            return True  # the stream is ending: its handler cleans up, nothing to deliver
        if transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT:
            return False
        transport.write(data)
        return True

    return write


async def _send_loop(ws: WebSocket, sub: Subscriber) -> None:
    while True:
        item = await sub.queue.get()
        if item is CLOSE:
            await ws.close(code=sub.close_code, reason=sub.close_reason[:120])
            return
        sub.busy = True
        try:
            if isinstance(item, Frame):
                if sub.raw is None:
                    await ws.send_text(item.text)
                elif not sub.raw(item.data):
                    sub.close("too slow: stream queue full", CloseCode.TOO_SLOW)
            else:
                assert isinstance(item, str)
                await _send(ws, item)
        finally:
            sub.busy = False
        del item


async def _send(ws: WebSocket, text: str) -> None:
    """A server message as text, or compressed in a binary frame when long (netmap.frame_server_message).
    A full map of thousands of peers is compressed in a worker thread: zlib releases the GIL, so the
    event loop goes on fanning out deltas meanwhile (60 ms for 10,000 peers on this machine)."""
    if len(text) >= COMPRESS_IN_THREAD_AT:
        framed = await asyncio.to_thread(netmap.frame_server_message, text)
    else:
        framed = netmap.frame_server_message(text)
    if isinstance(framed, bytes):
        await ws.send_bytes(framed)
    else:
        await ws.send_text(framed)


async def _receive_loop(ws: WebSocket, core: Core, node_id: int, sub: Subscriber) -> None:
    while not sub.close_reason:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        data = message.get("text") or message.get("bytes") or b""
        try:
            msg = netmap.decode_client_message(data)
        except netmap.NetmapError as exc:
            sub.push(netmap.encode_server_message(netmap.ErrorMessage(str(exc))))
            continue
        reply = await handle_client_message(core, node_id, msg)
        if reply is not None:
            sub.push(reply)
