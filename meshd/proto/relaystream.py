"""Relay frames out of a byte stream for the data path: :class:`meshd.proto.relay.FrameDecoder`'s framing
and checks, without a copy or an object per packet.

The relay (SEND_PACKET in) and meshd's relay link (RECV_PACKET in) get each packet frame as a
``(key, packet)`` pair where ``packet`` is a memoryview into the bytes the transport handed us: those are
immutable, so the view stays valid for as long as anyone holds it (a write queued in the transport, say),
and forwarding it costs no copy. Every other frame comes out as a :class:`~meshd.proto.relay.Frame`, as
from the decoder. Only a frame that straddles two reads is copied, into a buffer of its own size.
"""

from __future__ import annotations

from meshd.proto.relay import _LIMITS, HEADER, HEADER_LEN, KEY_LEN, Frame, FrameType, RelayProtocolError
from meshd.proto.relay import check_header as _check

Item = Frame | tuple[bytes, memoryview]  #: a control frame, or (key, packet) of a packet frame

_unpack = HEADER.unpack_from


class PacketStream:
    """Incremental splitter: :meth:`feed` the bytes of each read, get whole frames back in order.

    ``packet_type`` (SEND_PACKET at the relay, RECV_PACKET at meshd) is the frame type given as
    ``(key, packet)``. Raises :class:`RelayProtocolError` on an unknown type or a length outside the
    type's limits as soon as the header is in (an oversized frame is refused before it is buffered).
    """

    def __init__(self, packet_type: FrameType) -> None:
        self.packet_type = int(packet_type)
        self._max = _LIMITS[packet_type][1]
        self._rest = b""  #: the start of a frame that straddles reads

    @property
    def buffered(self) -> int:
        return len(self._rest)

    def _item(self, buf: bytes, view: memoryview, t: int, start: int, end: int) -> Item:
        if t == self.packet_type:
            return buf[start : start + KEY_LEN], view[start + KEY_LEN : end]
        return Frame(FrameType(t), buf[start:end])

    def feed(self, data: bytes) -> list[Item]:
        if type(data) is not bytes:  # a bytearray could change under the views we hand out
            data = bytes(data)
        out: list[Item] = []
        pos = self._finish(data, out) if self._rest else 0
        view = memoryview(data)
        n = len(data)
        ptype, pmax = self.packet_type, self._max
        while n - pos >= HEADER_LEN:
            t, length = _unpack(data, pos)
            if t != ptype or not KEY_LEN <= length <= pmax:
                _check(t, length, pos)
            start = pos + HEADER_LEN
            end = start + length
            if end > n:
                break
            if t == ptype:
                out.append((data[start : start + KEY_LEN], view[start + KEY_LEN : end]))
            else:
                out.append(Frame(FrameType(t), data[start:end]))
            pos = end
        if pos < n:
            self._rest = data[pos:]  # less than one frame
        return out

    def _finish(self, data: bytes, out: list[Item]) -> int:
        """Complete the straddling frame from the start of ``data``; how many bytes of it that took (all
        of them when the frame is still incomplete)."""
        rest = self._rest
        used = 0
        if len(rest) < HEADER_LEN:
            used = min(HEADER_LEN - len(rest), len(data))
            rest += data[:used]
            if len(rest) < HEADER_LEN:
                self._rest = rest
                return len(data)
        t, length = _unpack(rest, 0)
        length = int(length)
        _check(t, length, 0)
        take = min(HEADER_LEN + length - len(rest), len(data) - used)
        rest += data[used : used + take]
        used += take
        if len(rest) < HEADER_LEN + length:
            self._rest = rest
            return len(data)
        self._rest = b""
        out.append(self._item(rest, memoryview(rest), t, HEADER_LEN, HEADER_LEN + length))
        return used

    def eof(self) -> None:
        """The stream ended: leftover bytes mean a truncated frame."""
        if self._rest:
            raise RelayProtocolError(f"stream ended inside a frame ({len(self._rest)} bytes left)")
