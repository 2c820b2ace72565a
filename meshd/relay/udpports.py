"""UDP relay ports, meshd's asyncio shell around :class:`meshd.proto.relayport.PortClient`.

While a peer is relayed, meshd asks the relay for a UDP port pair over the relay session (the relay
session is authenticated; the pair is made once the peer asks too), sends bind datagrams to our port
from the WireGuard port itself (a raw socket: the NAT mapping the relay learns is WireGuard's), and once
both sides are bound points WireGuard straight at ``relay:our_port`` (:meth:`UdpPorts.endpoint`); the
TCP relay and the local proxy stay as the start and the fallback. A pair's region is the home region of
the side with the lower WireGuard key (both sides compute the same one from the map's ``relay_home``).

Peer relays (issue 14) use the same client: the coordinator's signed ``use`` (:mod:`meshd.proto.peerrelay`)
is a grant on a pseudo-region ``-<relay node id>`` whose address is the relay node's; its
``peer_relay_state`` signals play the part of PORT_STATE frames.

Without a raw socket (not root) there are no binds and so no UDP relay ports: peers stay on the TCP relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import socket
import time
from collections.abc import Callable

from meshd.nat.rawport import SO_ATTACH_FILTER, _SockFilter, _SockFprog, build_udp, mark_underlay
from meshd.proto import peerrelay, relay, relayport
from meshd.proto.endpoint import Endpoint
from meshd.proto.relayport import PortClient
from meshd.relay import link as rlink

log = logging.getLogger("meshd.relay")
PAST_PORTS = 4  #: relay ports remembered per peer (see ``UdpPorts._past``)


def _send_only_raw_socket() -> socket.socket:
    """A raw UDP socket that receives nothing (a cBPF ``ret 0``): it only sends binds. OSError if not root."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
    try:
        insns = (_SockFilter * 1)(_SockFilter(0x06, 0, 0, 0))
        prog = _SockFprog(1, insns)
        sock.setsockopt(
            socket.SOL_SOCKET, SO_ATTACH_FILTER, ctypes.string_at(ctypes.addressof(prog), ctypes.sizeof(prog))
        )
        mark_underlay(sock)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class UdpPorts:
    """Every relayed peer's UDP relay port, across regions (see the module docstring)."""

    def __init__(
        self,
        wg_port: int,
        *,
        on_moved: Callable[[bytes], None] = lambda key: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.wg_port = wg_port
        self.on_moved = on_moved
        self.clock = clock
        self._clients: dict[int, PortClient] = {}  #: region id -> its port client
        self._links: dict[int, rlink.RelayLink] = {}  #: region id -> the open link serving ports
        self._region_of: dict[bytes, int] = {}  #: wanted peer -> the region its pair lives on
        #: every relay port a peer has had (a few, newest last), kept after we stop wanting it: the
        #: relay forwards until the allocation idles out, so the peer's last packets sent that way still
        #: arrive from it and WireGuard roams there; the endpoint shell must recognise it to undo that
        self._past: dict[bytes, list[Endpoint]] = {}
        #: peer relays: the coordinator's offer per peer, and each pseudo-region's address
        self._offers: dict[bytes, peerrelay.Use] = {}
        self._addrs: dict[int, str] = {}
        self._sock: socket.socket | None = None
        self._disabled: str | None = None
        self._wake = asyncio.Event()
        self.binds_sent = 0

    # -- inputs ---------------------------------------------------------------------------------------
    def want(self, peer: bytes, region_id: int | None, on: bool) -> None:
        """``peer`` is relayed now (``on``) through ``region_id``'s pair, or not any more."""
        old = self._region_of.get(peer)
        if old is not None and (not on or old != region_id):
            self._client(old).want(peer, False, self.clock())
            del self._region_of[peer]
        if on and region_id is not None and self._usable():
            self._region_of[peer] = region_id
            self._client(region_id).want(peer, True, self.clock())
        self._flush()

    def forget_others(self, peers: set[bytes]) -> None:
        """Only these peers are in the map: stop wanting the others' ports."""
        for peer in [p for p in self._region_of if p not in peers]:
            self.want(peer, None, False)
        self._past = {p: eps for p, eps in self._past.items() if p in peers}
        self._offers = {p: use for p, use in self._offers.items() if p in peers}

    # -- peer relays ----------------------------------------------------------------------------------
    def offer(self, use: peerrelay.Use) -> None:
        """The coordinator offers a peer relay for ``use.peer`` (taken when the peer is relayed)."""
        old = self._offers.get(use.peer)
        self._offers[use.peer] = use
        self._addrs[-use.relay] = use.addr
        if old is not None and old.relay == use.relay and self._region_of.get(use.peer) == -use.relay:
            self._client(-use.relay).granted(self._grant(use), self.clock())
        self._flush()

    def withdraw(self, peer: bytes) -> None:
        self._offers.pop(peer, None)

    def offered(self, peer: bytes) -> peerrelay.Use | None:
        """The peer relay offered for ``peer`` (None: none, or no raw socket to bind with)."""
        use = self._offers.get(peer)
        return use if use is not None and self._usable() else None

    def peer_state(self, from_node: int, peer: bytes, flags: relayport.PortFlags) -> None:
        """A ``peer_relay_state`` signal: taken only from the relay our offer for ``peer`` names."""
        use = self._offers.get(peer)
        if use is None or use.relay != from_node or self._region_of.get(peer) != -from_node:
            return
        self._client(-from_node).state(peer, flags, self.clock())
        self._flush()

    def via_peer(self, peer: bytes) -> peerrelay.Use | None:
        """The peer relay this peer's packets take now (both sides bound), else None."""
        rid = self._region_of.get(peer)
        use = self._offers.get(peer)
        if rid is None or rid >= 0 or use is None or self.endpoint(peer) is None:
            return None
        return use

    @staticmethod
    def _grant(use: peerrelay.Use) -> relayport.Grant:
        return relayport.Grant(use.peer, use.port, use.secret, int(relayport.IDLE_TIMEOUT))

    def _ip(self, rid: int) -> str | None:
        if rid < 0:
            return self._addrs.get(rid)
        link = self._links.get(rid)
        return link.peer_ip if link is not None else None

    def session_up(self, region_id: int, link: rlink.RelayLink) -> None:
        if not link.udp_ports or link.peer_ip is None:
            return
        self._links[region_id] = link
        link.on_port = lambda f: self._frame(region_id, f)
        self._client(region_id).session_up(self.clock())
        self._flush()

    def session_lost(self, region_id: int) -> None:
        self._links.pop(region_id, None)
        if region_id in self._clients:
            self._clients[region_id].session_lost(self.clock())
        self._flush()

    # -- outputs --------------------------------------------------------------------------------------
    def endpoint(self, peer: bytes) -> Endpoint | None:
        """``relay:our_port`` once both sides are bound, else None (the TCP relay)."""
        rid = self._region_of.get(peer)
        ip = self._ip(rid) if rid is not None else None
        if rid is None or ip is None:
            return None
        port = self._clients[rid].port(peer)
        return (ip, port) if port is not None else None

    def was_endpoint(self, peer: bytes, ep: Endpoint) -> bool:
        """``ep`` is (or was, while this peer is in the map) one of ``peer``'s UDP relay ports."""
        return ep == self.endpoint(peer) or ep in self._past.get(peer, ())

    async def run(self) -> None:
        """The bind timer (run it supervised)."""
        while True:
            now = self.clock()
            for c in self._clients.values():
                c.handle_timer(now)
            self._flush()
            self._wake.clear()  # after the flush: it wakes us for the inputs that come from outside
            timers = [t for c in self._clients.values() if (t := c.next_timer()) is not None]
            wait = min(1.0, max(0.0, min(timers) - self.clock())) if timers else 1.0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._disabled = "closed"

    # -- internals ------------------------------------------------------------------------------------
    def _client(self, region_id: int) -> PortClient:
        c = self._clients.get(region_id)
        if c is None:
            base = (lambda: int(time.time() * 1000)) if region_id < 0 else (lambda: 0)
            c = self._clients[region_id] = PortClient(base)
        return c

    def _usable(self) -> bool:
        if self._sock is not None:
            return True
        if self._disabled is not None:
            return False
        try:
            self._sock = _send_only_raw_socket()
        except OSError as exc:
            self._disabled = str(exc)
            log.info("UDP relay ports off (no raw socket for binds: %s): peers stay on the TCP relay", exc)
            return False
        return True

    def _frame(self, region_id: int, frame: relay.Frame) -> None:
        c = self._clients.get(region_id)
        if c is None:
            return
        try:
            if frame.type == relay.FrameType.PORT_GRANT:
                c.granted(relayport.decode_grant(frame.payload), self.clock())
            else:
                peer, flags = relayport.decode_state(frame.payload)
                c.state(peer, flags, self.clock())
        except relayport.RelayPortError as exc:
            log.warning("relay port message ignored: %s", exc)
            return
        self._flush()

    def _flush(self) -> None:
        for _ in range(3):  # a peer relay's re-grant (below) makes events of its own: one more round
            if not self._flush_once():
                break
        self._wake.set()

    def _flush_once(self) -> bool:
        more = False
        for rid, c in list(self._clients.items()):
            link = self._links.get(rid)
            ip = self._ip(rid)
            for ev in c.events():
                if isinstance(ev, relayport.SendRequest):
                    if rid < 0:  # a peer relay is never asked: the coordinator's offer is the grant
                        use = self._offers.get(ev.peer)
                        if use is not None and -use.relay == rid:
                            c.granted(self._grant(use), self.clock())
                            more = True
                    elif link is not None and link.is_open:
                        link.request_port(ev.peer)
                elif isinstance(ev, relayport.SendBind):
                    if ip is not None and self._sock is not None:
                        try:
                            self._sock.sendto(build_udp(self.wg_port, (ip, ev.port), ev.data), (ip, 0))
                            self.binds_sent += 1
                        except OSError as exc:
                            log.debug("bind to %s:%d: %s", ip, ev.port, exc)
                else:
                    if ev.port is not None and ip is not None:
                        past = self._past.setdefault(ev.peer, [])
                        ep = (ip, ev.port)
                        if ep not in past:
                            past.append(ep)
                            del past[:-PAST_PORTS]
                    log.info(
                        "relay %s: peer %s on %s",
                        rid if rid >= 0 else f"peer node {-rid}",
                        ev.peer.hex()[:8],
                        f"UDP relay port {ev.port}" if ev.port is not None else "the TCP relay",
                    )
                    try:
                        self.on_moved(ev.peer)
                    except Exception:  # the callback's bug must not break the relay client
                        log.exception("relay port callback failed")
        return more
