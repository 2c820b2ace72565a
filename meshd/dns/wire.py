"""The answer to one DNS query, with dnspython doing the wire format (the rules: meshd.dns.zone).

Imported on the first query (or by :func:`meshd.dns.zone.warm`), never at start-up: dnspython costs
~40 ms of CPU that ``meshd up`` has better uses for before its first ping (issue 15).
"""

from __future__ import annotations

import functools
import ipaddress

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

from meshd.dns.zone import TCP_LIMIT, TTL, UDP_LIMIT, Zone

_HEADER = 12
_REVERSE = (dns.name.from_text("in-addr.arpa."), dns.name.from_text("ip6.arpa."))


@functools.lru_cache(maxsize=4)
def origin(domain: str) -> dns.name.Name:
    """The zone's domain as dnspython's name (one per map's domain, kept: a zone is swapped per map)."""
    return dns.name.from_text(domain)


def fqdn(zone: Zone, name: str) -> dns.name.Name:
    return dns.name.from_text(name, origin=origin(zone.domain))


def key(text: str) -> str | None:
    """meshd.dns.zone._key for names that are not plain labels: dnspython reads them."""
    try:
        n = dns.name.from_text(text, origin=None)
    except (dns.exception.DNSException, ValueError):
        return None
    text = n.to_text().lower()
    if not n.labels or text in ("", "@") or any(not label for label in n.labels):
        return None
    if any(not (c.isascii() and (c.isalnum() or c == "-")) for c in text.replace(".", "")):
        return None
    return text


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
    domain = origin(zone.domain)
    if qname.is_subdomain(domain):
        response.flags |= dns.flags.AA
        if qname == domain:
            return dns.rcode.NOERROR  # the apex exists (it has our names below it), no data here
        addrs = zone.names.get(qname.relativize(domain).to_text().lower())
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
            target = fqdn(zone, owner).to_text()
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
