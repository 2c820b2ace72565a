"""The mesh's names and the answer to one DNS query (sans-IO: bytes in, bytes out, no sockets, no clock).

:class:`Zone` is built from what meshd already trusts: this node, every peer whose certificate verified
(meshd.peerset; names and addresses come from the certificate) and the admin's extra records from the
map. :func:`answer` turns one query message (RFC 1035 §4.1) into the response message, with dnspython
doing the wire format:

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
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.reversename
import dns.rrset

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

TTL = 0  #: seconds; 0: nothing caches a name, so a change answers correctly at once
UDP_LIMIT = 512  #: RFC 1035 §2.3.4, without EDNS
TCP_LIMIT = 65535
_HEADER = 12
_REVERSE = (dns.name.from_text("in-addr.arpa."), dns.name.from_text("ip6.arpa."))


@dataclass(frozen=True, slots=True)
class Zone:
    """Every name the resolver answers for, and the reverse map. Build it with :func:`build`."""

    domain: dns.name.Name
    names: Mapping[str, tuple[IPAddress, ...]] = field(default_factory=dict)  #: "b" or "db.prod"
    reverse: Mapping[IPAddress, str] = field(default_factory=dict)  #: address -> "b"
    networks: tuple[IPNetwork, ...] = ()  #: the overlay prefixes (NXDOMAIN, not REFUSED, for PTR)

    def fqdn(self, name: str) -> dns.name.Name:
        return dns.name.from_text(name, origin=self.domain)


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
    origin = dns.name.from_text(domain or "mesh")
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


def _key(name: str) -> str | None:
    """A relative name as the zone stores it (lower case, no trailing dot), or None when invalid."""
    try:
        n = dns.name.from_text(name.strip().rstrip("."), origin=None)
    except (dns.exception.DNSException, ValueError):
        return None
    text = n.to_text().lower()
    if not n.labels or text in ("", "@") or any(not label for label in n.labels):
        return None
    if any(not (c.isascii() and (c.isalnum() or c == "-")) for c in text.replace(".", "")):
        return None
    return text


def _address(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_interface(text).ip
    except ValueError:
        return None


def answer(query: bytes, zone: Zone, *, tcp: bool = False) -> bytes | None:
    """The response to one query message, or None when nothing must be sent back."""
    if len(query) < _HEADER or query[2] & 0x80:  # too short to answer, or a response (QR set)
        return None
    try:
        msg = dns.message.from_wire(query)
    except dns.exception.DNSException:
        return _error(query, dns.rcode.FORMERR)
    except Exception:  # dnspython raises a few plain errors on odd input (EDNS, TSIG): still a FORMERR
        return _error(query, dns.rcode.FORMERR)
    response = dns.message.make_response(msg)
    response.flags &= ~dns.flags.RA  # we only answer for the mesh: no recursion offered
    if msg.opcode() != dns.opcode.QUERY:
        response.set_rcode(dns.rcode.NOTIMP)
    elif len(msg.question) != 1 or msg.question[0].rdclass != dns.rdataclass.IN:
        response.set_rcode(dns.rcode.FORMERR if len(msg.question) != 1 else dns.rcode.REFUSED)
    else:
        q = msg.question[0]
        response.set_rcode(_lookup(zone, q.name, q.rdtype, response))
    return _wire(response, msg, tcp)


def _lookup(zone: Zone, qname: dns.name.Name, qtype: int, response: dns.message.Message) -> dns.rcode.Rcode:
    """Fill `response` for one question; the rcode."""
    if qname.is_subdomain(zone.domain):
        response.flags |= dns.flags.AA
        if qname == zone.domain:
            return dns.rcode.NOERROR  # the apex exists (it has our names below it), no data here
        key = qname.relativize(zone.domain).to_text().lower()
        addrs = zone.names.get(key)
        if addrs is None:
            return dns.rcode.NXDOMAIN
        want = [
            a
            for a in addrs
            if qtype == dns.rdatatype.ANY
            or (qtype == dns.rdatatype.A and a.version == 4)
            or (qtype == dns.rdatatype.AAAA and a.version == 6)
        ]
        for version, rdtype in ((4, "A"), (6, "AAAA")):
            texts = [str(a) for a in want if a.version == version]
            if texts:
                response.answer.append(dns.rrset.from_text_list(qname, TTL, "IN", rdtype, texts))
        return dns.rcode.NOERROR
    if any(qname.is_subdomain(r) for r in _REVERSE):
        try:
            addr = ipaddress.ip_address(dns.reversename.to_address(qname))
        except (dns.exception.DNSException, ValueError):
            return dns.rcode.REFUSED  # a partial reverse name (a zone cut): not ours to answer
        owner = zone.reverse.get(addr)
        if owner is None:
            if any(addr in n for n in zone.networks if n.version == addr.version):
                response.flags |= dns.flags.AA
                return dns.rcode.NXDOMAIN
            return dns.rcode.REFUSED
        response.flags |= dns.flags.AA
        if qtype in (dns.rdatatype.PTR, dns.rdatatype.ANY):
            target = zone.fqdn(owner).to_text()
            response.answer.append(dns.rrset.from_text_list(qname, TTL, "IN", "PTR", [target]))
        return dns.rcode.NOERROR
    return dns.rcode.REFUSED


def _wire(response: dns.message.Message, query: dns.message.Message, tcp: bool) -> bytes:
    limit = TCP_LIMIT if tcp else max(UDP_LIMIT, query.payload if query.edns >= 0 else UDP_LIMIT)
    try:
        return response.to_wire(max_size=limit)
    except dns.exception.TooBig:
        response.answer.clear()
        response.flags |= dns.flags.TC
        return response.to_wire(max_size=limit)


def _error(query: bytes, rcode: dns.rcode.Rcode) -> bytes:
    """A bare error response (header only) to a message dnspython could not parse."""
    msg = dns.message.Message(id=int.from_bytes(query[:2], "big"))
    msg.flags = dns.flags.QR | (int.from_bytes(query[2:4], "big") & dns.flags.RD)
    msg.set_rcode(rcode)
    return msg.to_wire()
