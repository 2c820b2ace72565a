"""A wire with latency, in user space: forwards Ethernet frames between two interfaces after a delay.

    python delay.py IF_A IF_B DELAY_MS

This kernel has no sch_netem (and no sch_fq for EDT delays), so a lab link that needs latency runs this
in a namespace of its own between a router's WAN and the internet bridge. Each frame seen on one side
(AF_PACKET, promiscuous, incoming frames only) is sent on the other side ``DELAY_MS`` later, order kept.
Segmentation offloads are turned off on both interfaces by the lab so that every frame fits the MTU.
Prints "ready" once both sockets are bound; exits when its stdin closes or on SIGTERM.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import selectors
import signal
import socket
import struct
import sys
import time

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1
PACKET_OUTGOING = 4
MAX_QUEUE = 20_000  # frames in flight per direction before dropping (bounded memory)


def _open(ifname: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((ifname, ETH_P_ALL))
    index = socket.if_nametoindex(ifname)
    s.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, struct.pack("iHH8s", index, PACKET_MR_PROMISC, 0, b""))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    s.setblocking(False)
    return s


def main() -> int:
    if_a, if_b, delay_ms = sys.argv[1], sys.argv[2], float(sys.argv[3])
    delay = delay_ms / 1000.0
    a, b = _open(if_a), _open(if_b)
    other = {a: b, b: a}
    sel = selectors.DefaultSelector()
    sel.register(a, selectors.EVENT_READ)
    sel.register(b, selectors.EVENT_READ)
    running = True

    def stop(*_: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    queue: list[tuple[float, int, socket.socket, bytes]] = []
    seq = 0
    print("ready", flush=True)
    while running:
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, out, frame = heapq.heappop(queue)
            with contextlib.suppress(OSError):  # a frame the other side cannot take is lost, as on a wire
                out.send(frame)
        timeout = max(0.0, queue[0][0] - now) if queue else 0.5
        for key, _ in sel.select(timeout):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            for _ in range(256):
                try:
                    frame, addr = sock.recvfrom(65535)
                except BlockingIOError:
                    break
                if addr[2] == PACKET_OUTGOING or len(queue) >= MAX_QUEUE:
                    continue  # our own transmissions, or the queue is full (drop, as a router would)
                seq += 1
                heapq.heappush(queue, (time.monotonic() + delay, seq, other[sock], frame))
        if os.getppid() == 1:
            break  # the lab that started us is gone
    return 0


if __name__ == "__main__":
    sys.exit(main())
