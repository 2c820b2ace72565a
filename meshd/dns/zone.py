"""The mesh's names and the answer to one DNS query (sans-IO: bytes in, bytes out, no sockets, no clock).

:class:`Zone` is built from what meshd already trusts: this node, every peer whose certificate verified
(meshd.peerset; names and addresses come from the certificate) and the admin's extra records from the
map. :func:`answer` turns one query message (RFC 1035 §4.1) into the response message, with dnspython
doing the wire format (meshd.dns.wire):

- ``<name>.<domain>`` A / AAAA (and ANY): the addresses, authoritative, TTL 0 so that a join, rename or
  removal is seen by the next query (the zone is swapped as soon as a map is applied); another type of
  a name that exists: NOERROR without answers (NODATA); an unknown name under the domain: NXDOMAIN;
- PTR for ``in-addr.arpa`` / ``ip6.arpa`` names of overlay addresses: the node's name; an address of
  the overlay prefixes that no node holds: NXDOMAIN;
- everything else: REFUSED. The resolver never forwards a query anywhere, so no name the host looks up
  can leak to a peer or to the coordinator; the host's own resolvers keep answering other names (split
  DNS through systemd-resolved sends only ``~<domain>`` here, meshd.dns.system);
- only standard queries (opcode QUERY) with one question of class IN; others get NOTIMP or FORMERR; a
  message that is not a query (QR set) or shorter than a header gets no answer at all (no reflection,
  no loops between two resolvers).

UDP answers that do not fit the client's size (512 bytes, or its EDNS payload size) go out truncated
(TC) so that the client asks again over TCP (RFC 1035 §4.2.1, RFC 7766).

This module imports no dnspython (issue 15: ~40 ms of CPU at ``meshd up``, before the first ping): a
zone is plain data, built on every map applied, and names of the usual shape (letters, digits, hyphens)
are checked here exactly as dnspython would check them. Anything else (escapes, non-ASCII names) goes to
dnspython, as does every query: :mod:`meshd.dns.wire` is imported on the first query, or earlier off
the event loop by :func:`warm`.
"""

from __future__ import annotations

import ipaddress
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

TTL = 0  #: seconds; 0: nothing caches a name, so a change answers correctly at once
UDP_LIMIT = 512  #: RFC 1035 §2.3.4, without EDNS
TCP_LIMIT = 65535
#: a name dnspython reads as plain labels: no escapes, no IDNA, no empty label
_PLAIN = re.compile(r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*")
_MAX_LABEL = 63  #: dns.name.LabelTooLong above
_MAX_NAME = 255  #: dns.name.NameTooLong above: the labels' lengths plus one each


@dataclass(frozen=True, slots=True)
class Zone:
    """Every name the resolver answers for, and the reverse map. Build it with :func:`build`."""

    domain: str  #: as the map gives it ("mesh", "corp.example"): dnspython reads it per query (wire.py)
    names: Mapping[str, tuple[IPAddress, ...]] = field(default_factory=dict)  #: "b" or "db.prod"
    reverse: Mapping[IPAddress, str] = field(default_factory=dict)  #: address -> "b"
    networks: tuple[IPNetwork, ...] = ()  #: the overlay prefixes (NXDOMAIN, not REFUSED, for PTR)


def build(
    domain: str,
    nodes: Iterable[tuple[str, Iterable[str]]],
    extra: Iterable[tuple[str, str]] = (),
    networks: Iterable[str] = (),
) -> Zone:
    """A zone for `domain` from (node name, addresses or interfaces such as ``100.64.0.2/32``) pairs,
    admin records (name, address) and the overlay prefixes.

    Admin records win over nodes of the same name, this node included (issue 12: nodes choose their own
    names, so a node must never answer for ``printer``; the coordinator gives such a node a suffix and
    refuses a record on a node's name, this is the defence in depth); the node that lost its name gets
    no PTR name either. Names are compared case-insensitively. Entries that are not a valid name or
    address are skipped: they came from the network."""
    origin = _domain(domain or "mesh")
    names: dict[str, tuple[IPAddress, ...]] = {}
    reverse: dict[IPAddress, str] = {}
    admin: dict[str, list[IPAddress]] = {}
    for name, ip in extra:
        key, addr = _key(name), _address(ip)
        if key is None or addr is None:
            continue
        admin.setdefault(key, []).append(addr)
    for key, more in admin.items():
        names[key] = tuple(dict.fromkeys(more))
        for a in more:
            reverse.setdefault(a, key)
    held: dict[IPAddress, str] = {}  #: overlay address -> node: its PTR name, whatever a record says
    for name, ips in nodes:
        key = _key(name)
        addrs = tuple(a for a in (_address(ip) for ip in ips) if a is not None)
        if key is None or key in names or not addrs:
            continue
        names[key] = addrs
        for a in addrs:
            held.setdefault(a, key)
    reverse.update(held)
    nets: list[IPNetwork] = []
    for n in networks:
        try:
            nets.append(ipaddress.ip_network(n, strict=False))
        except ValueError:
            continue
    return Zone(origin, names, reverse, tuple(nets))


def _plain_fits(text: str, absolute: bool) -> bool | None:
    """Whether dnspython takes `text` as a name (labels of letters, digits and hyphens), or None when
    the text is not of that shape and only dnspython can tell."""
    if _PLAIN.fullmatch(text) is None:
        return None
    labels = text.split(".")
    total = sum(len(label) + 1 for label in labels) + (1 if absolute else 0)  # the root label
    return total <= _MAX_NAME and all(len(label) <= _MAX_LABEL for label in labels)


def _domain(text: str) -> str:
    """The zone's domain as given; dnspython's error (as before) when it is no name at all."""
    if _plain_fits(text.removesuffix("."), absolute=True):
        return text
    from meshd.dns import wire  # escapes, IDNA, a name too long: dnspython says, or raises as before

    wire.origin(text)
    return text


def _key(name: str) -> str | None:
    """A relative name as the zone stores it (lower case, no trailing dot), or None when invalid."""
    text = name.strip().rstrip(".")
    fits = _plain_fits(text, absolute=False)
    if fits is None:  # escapes, non-ASCII (IDNA), empty labels: dnspython decides, as it always did
        from meshd.dns import wire

        return wire.key(text)
    return text.lower() if fits else None


def _address(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_interface(text).ip
    except ValueError:
        return None


def answer(query: bytes, zone: Zone, *, tcp: bool = False) -> bytes | None:
    """The response to one query message, or None when nothing must be sent back (meshd.dns.wire)."""
    from meshd.dns import wire  # after the first query (or warm()): a look-up in sys.modules

    return wire.answer(query, zone, tcp=tcp)


def warmed() -> bool:
    return "meshd.dns.wire" in sys.modules


def warm() -> None:
    """Import dnspython now (in a thread: meshd.dns.server), so that the first query need not."""
    from meshd.dns import wire  # noqa: F401
