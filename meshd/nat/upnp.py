"""UPnP IGD port maps through miniupnpc (blocking calls: the asyncio shell runs them in daemon threads
with a deadline, see meshd.nat.mapper, so an unreachable router never holds up meshd or its exit).

Our mappings carry the description ``meshd <tag>`` so that, after a crash, the next start finds and
replaces its own stale maps (and never touches anyone else's).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any

from meshd.proto import ssdp

log = logging.getLogger("meshd.nat.upnp")


class UpnpError(Exception):
    """No IGD answered, or it refused the mapping; the text says which."""


@dataclass(frozen=True, slots=True)
class UpnpMapping:
    external_ip: str
    external_port: int
    internal_ip: str
    internal_port: int
    lease: int


class Igd:
    """One discovered IGD (a miniupnpc client: every method blocks, one call at a time).

    Kept by the port-map shell after discovery so that renewing and, above all, deleting on the way out
    need no new discovery (that alone takes ``discover_ms``).
    """

    def __init__(self, client: Any) -> None:
        self._u = client

    @classmethod
    def discover(cls, *, gateway: str | None = None, discover_ms: int = 300) -> Igd:
        """Our own SSDP search first (meshd.proto.ssdp: the first answer ends it, ~50 ms against
        miniupnpc's full second); miniupnpc's discovery when it finds nothing usable."""
        location = find_location(gateway, within=SEARCH_WITHIN)
        if location is not None:
            try:
                return cls(_client_at(location))
            except UpnpError as e:
                log.debug("UPnP: the device at %s: %s; trying miniupnpc's discovery", location, e)
        return cls(_client(discover_ms))

    def external_ip(self) -> str:
        try:
            return str(self._u.externalipaddress())
        except Exception as e:
            raise UpnpError(f"IGD has no external address: {e}") from None

    def add_mapping(self, internal_port: int, lease: int, tag: str) -> UpnpMapping:
        return _add(self._u, internal_port, lease, tag)

    def delete_mapping(self, external_port: int) -> None:
        try:
            self._u.deleteportmapping(external_port, "UDP")
        except Exception as e:
            raise UpnpError(f"deleting UDP {external_port}: {e}") from None


SEARCH_WITHIN = 0.4  #: seconds our SSDP search waits for a gateway's answer (miniupnpd: ~50 ms)


def find_location(gateway: str | None, *, within: float) -> str | None:
    """The description URL of the first IGD that answers an SSDP search within ``within`` s (blocking).

    The search goes to the SSDP multicast group and, when we know the gateway, to its port 1900 as well
    (UDA 1.1 §1.3.2 unicast search), twice for each IGD version: a lost datagram costs no full second."""
    deadline = time.monotonic() + within
    requests = [ssdp.search(t) for t in ssdp.TARGETS]
    destinations = [ssdp.MULTICAST] + ([(gateway, ssdp.PORT)] if gateway else [])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 2)  # as miniupnpc: the LAN only

        def send_all() -> None:
            for dst in destinations:
                for req in requests:
                    with contextlib.suppress(OSError):  # no route to one of them: the other may do
                        sock.sendto(req, dst)

        send_all()
        again = True  # once more half-way through, for a lost datagram
        while (left := deadline - time.monotonic()) > 0:
            if again and left <= within / 2:
                send_all()
                again = False
            sock.settimeout(max(0.001, left - within / 2 if again else left))
            try:
                data, src = sock.recvfrom(ssdp.MAX_ANSWER + 1)
            except TimeoutError:
                continue
            except OSError:
                return None
            answer = ssdp.parse_answer(data, src[0])
            if answer is not None:
                return answer.location
    return None


def _client_at(location: str) -> Any:
    """A miniupnpc client for the IGD described at ``location`` (no discovery)."""
    return _client(0, location)


def _client(discover_ms: int, location: str | None = None) -> Any:
    try:
        import miniupnpc
    except ImportError as e:  # pragma: no cover - a dependency of the project
        raise UpnpError(f"miniupnpc is not installed: {e}") from None
    u = miniupnpc.UPnP()
    u.discoverdelay = discover_ms
    try:
        if location is not None:
            u.selectigd(location)  # reads the description there: UPNP_GetIGDFromUrl
        elif u.discover() == 0:
            raise UpnpError("no UPnP device answered")
        else:
            u.selectigd()
    except Exception as e:  # miniupnpc raises plain Exception
        raise UpnpError(f"no UPnP IGD: {e}") from None
    return u


def probe(*, discover_ms: int = 300) -> str:
    """Find an IGD without mapping anything; its external address (UpnpError when there is none)."""
    return Igd.discover(discover_ms=discover_ms).external_ip()


def description(tag: str) -> str:
    return f"meshd {tag}"[:64]


def add_mapping(internal_port: int, lease: int, tag: str, *, discover_ms: int = 300) -> UpnpMapping:
    """Map UDP ``internal_port`` (same external port if free, else the next free ones); replaces our own
    stale entries first."""
    return _add(_client(discover_ms), internal_port, lease, tag)


def _add(u: Any, internal_port: int, lease: int, tag: str) -> UpnpMapping:
    desc = description(tag)
    _remove_ours(u, desc)
    try:
        external_ip = str(u.externalipaddress())
    except Exception as e:
        raise UpnpError(f"IGD has no external address: {e}") from None
    lan = str(u.lanaddr)
    for eport in (internal_port, *range(internal_port + 1, internal_port + 8)):
        if not 0 < eport < 65536:
            continue
        try:
            ok = u.addportmapping(eport, "UDP", lan, internal_port, desc, "", lease)
        except Exception as e:
            log.debug("UPnP map %d failed: %s", eport, e)
            continue
        if ok:
            return UpnpMapping(external_ip, eport, lan, internal_port, lease)
    raise UpnpError("the IGD refused every port we asked for")


def delete_mapping(external_port: int, *, discover_ms: int = 300) -> None:
    Igd.discover(discover_ms=discover_ms).delete_mapping(external_port)


def _remove_ours(u: Any, desc: str) -> None:
    """Delete mappings with our description (left by a crashed run of this same daemon)."""
    stale = []
    for i in range(256):
        try:
            entry = u.getgenericportmapping(i)
        except Exception:
            break
        if entry is None:
            break
        # (eport, proto, (iaddr, iport), desc, enabled, rhost, lease)
        if len(entry) >= 4 and entry[3] == desc:
            stale.append((entry[0], entry[1]))
    for eport, proto in stale:
        try:
            u.deleteportmapping(eport, proto)
            log.info("removed our stale UPnP mapping %s %s", proto, eport)
        except Exception as e:
            log.debug("removing stale UPnP mapping %s: %s", eport, e)
