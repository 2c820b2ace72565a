"""Tiny UDP/TCP tools run inside lab namespaces (a standalone script: stdlib only).

    echo.py serve [--udp PORT] [--tcp PORT] [--tcp6 PORT]
                                                  reply to every datagram / connection with "ip:port\\n"
                                                  (the source address the server observed), forever;
                                                  --tcp6: also TCP over IPv6 (a listener of its own)
    echo.py ask --port P HOST:PORT...            from local UDP port P, ask each server in turn; print one
                                                  observed "ip:port" per line ("-" if no answer in time)
    echo.py ask-tcp HOST:PORT                    the same over one TCP connection
    echo.py listen --port P [--timeout S] [--punch HOST:PORT]
                                                  wait for one datagram on UDP port P; print "ip:port payload"
                                                  and reply "ack"; exit 1 with "timeout" if none came. With
                                                  --punch, first ask that echo server from P and print
                                                  "mapped ip:port" (opens the NAT mapping) before "ready"
    echo.py send --port P HOST:PORT [PAYLOAD]    send one datagram from local port P (0: any)

Every wait is bounded (ask: 3 s over 6 tries per server; listen: 5 s). Only addresses given on the
command line are contacted.
"""

from __future__ import annotations

import argparse
import contextlib
import selectors
import socket
import sys


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _udp(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    return s


def serve(udp_port: int | None, tcp_port: int | None, tcp6_port: int | None = None) -> int:
    sel = selectors.DefaultSelector()
    if udp_port is not None:
        sel.register(_udp(udp_port), selectors.EVENT_READ, "udp")
    for family, any_addr, port in ((socket.AF_INET, "0.0.0.0", tcp_port), (socket.AF_INET6, "::", tcp6_port)):
        if port is None:
            continue
        t = socket.socket(family, socket.SOCK_STREAM)
        t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:  # IPv6 only: IPv4 clients keep their plain "a.b.c.d" on --tcp
            t.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        t.bind((any_addr, port))
        t.listen(16)
        sel.register(t, selectors.EVENT_READ, "tcp")
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if key.data == "udp":
                _, src = sock.recvfrom(2048)
                sock.sendto(f"{src[0]}:{src[1]}\n".encode(), src)
            else:
                conn, src = sock.accept()
                with conn:
                    conn.settimeout(1.0)
                    with contextlib.suppress(OSError):
                        conn.sendall(f"{src[0]}:{src[1]}\n".encode())


def ask(port: int, servers: list[tuple[str, int]], timeout: float, tries: int) -> int:
    s = _udp(port)
    s.settimeout(timeout / tries)
    for server in servers:
        answer = "-"
        for _ in range(tries):
            s.sendto(b"?", server)
            try:
                data, src = s.recvfrom(2048)
            except TimeoutError:
                continue
            if src == server:
                answer = data.decode().strip()
                break
        print(answer, flush=True)
    return 0


def ask_tcp(server: tuple[str, int], timeout: float) -> int:
    try:
        with socket.create_connection(server, timeout=timeout) as c:
            print(c.recv(128).decode().strip())
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def listen(port: int, timeout: float, punch: tuple[str, int] | None) -> int:
    s = _udp(port)
    if punch is not None:
        s.settimeout(0.5)
        mapped = "-"
        for _ in range(6):
            s.sendto(b"?", punch)
            try:
                data, src = s.recvfrom(2048)
            except TimeoutError:
                continue
            if src == punch:
                mapped = data.decode().strip()
                break
        print(f"mapped {mapped}", flush=True)
    s.settimeout(timeout)
    print("ready", flush=True)
    try:
        data, src = s.recvfrom(2048)
    except TimeoutError:
        print("timeout", flush=True)
        return 1
    s.sendto(b"ack", src)
    print(f"{src[0]}:{src[1]} {data.decode(errors='replace')}", flush=True)
    return 0


def send(port: int, target: tuple[str, int], payload: str) -> int:
    s = _udp(port)
    s.sendto(payload.encode(), target)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="echo.py")
    sub = p.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("serve")
    sp.add_argument("--udp", type=int)
    sp.add_argument("--tcp", type=int)
    sp.add_argument("--tcp6", type=int)
    ap = sub.add_parser("ask")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--timeout", type=float, default=3.0)
    ap.add_argument("--tries", type=int, default=6)
    ap.add_argument("servers", type=_addr, nargs="+")
    tp = sub.add_parser("ask-tcp")
    tp.add_argument("server", type=_addr)
    tp.add_argument("--timeout", type=float, default=3.0)
    lp = sub.add_parser("listen")
    lp.add_argument("--port", type=int, required=True)
    lp.add_argument("--timeout", type=float, default=5.0)
    lp.add_argument("--punch", type=_addr)
    np = sub.add_parser("send")
    np.add_argument("--port", type=int, default=0)
    np.add_argument("target", type=_addr)
    np.add_argument("payload", nargs="?", default="hello")
    a = p.parse_args(argv)
    if a.cmd == "serve":
        if a.udp is None and a.tcp is None and a.tcp6 is None:
            p.error("serve needs --udp, --tcp and/or --tcp6")
        return serve(a.udp, a.tcp, a.tcp6)
    if a.cmd == "ask":
        return ask(a.port, a.servers, a.timeout, max(1, a.tries))
    if a.cmd == "ask-tcp":
        return ask_tcp(a.server, a.timeout)
    if a.cmd == "listen":
        return listen(a.port, a.timeout, a.punch)
    return send(a.port, a.target, a.payload)


if __name__ == "__main__":
    sys.exit(main())
