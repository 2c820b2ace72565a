"""The resolver's answers (meshd/dns/zone.py), through dnspython's own client-side messages."""

from __future__ import annotations

import ipaddress

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.reversename
from hypothesis import example, given
from hypothesis import strategies as st

from meshd.dns.zone import Zone, answer, build

ZONE = build(
    "mesh",
    [("a", ["100.64.0.1/32", "fd00:1::1/128"]), ("b", ["100.64.0.2/32"])],
    [("printer", "10.1.0.5"), ("db.prod", "fd00:2::7"), ("b", "10.9.9.9")],
    ["100.64.0.0/10", "fd00:1::/48"],
)


def ask(name: str, rdtype: str, zone: Zone = ZONE, **kw: object) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype, **kw)  # type: ignore[arg-type]
    wire = answer(q.to_wire(), zone)
    assert wire is not None
    r = dns.message.from_wire(wire)
    assert r.id == q.id and r.flags & dns.flags.QR
    return r


def values(r: dns.message.Message) -> list[str]:
    return sorted(rd.to_text() for rrset in r.answer for rd in rrset)


def test_a_and_aaaa_of_a_node_are_its_addresses_authoritatively() -> None:
    r = ask("a.mesh", "A")
    assert r.rcode() == dns.rcode.NOERROR and r.flags & dns.flags.AA
    assert values(r) == ["100.64.0.1"]
    assert values(ask("a.mesh.", "AAAA")) == ["fd00:1::1"]
    assert r.answer[0].ttl == 0  # nothing caches a name: a change is seen by the next query


def test_names_are_case_insensitive() -> None:
    assert values(ask("A.MeSh", "A")) == ["100.64.0.1"]


def test_a_type_the_name_lacks_is_nodata_and_an_unknown_name_nxdomain() -> None:
    r = ask("b.mesh", "AAAA")
    assert r.rcode() == dns.rcode.NOERROR and r.answer == []
    r = ask("nobody.mesh", "A")
    assert r.rcode() == dns.rcode.NXDOMAIN and r.flags & dns.flags.AA
    assert ask("mesh", "SOA").rcode() == dns.rcode.NOERROR


def test_admin_records_answer_and_win_over_a_node_of_the_same_name() -> None:
    assert values(ask("printer.mesh", "A")) == ["10.1.0.5"]
    assert values(ask("db.prod.mesh", "AAAA")) == ["fd00:2::7"]
    # the admin record "b", not the node "b" (nodes choose their names; the coordinator never lets a
    # node take a record's name, this is the defence in depth: issue 12)
    assert values(ask("b.mesh", "A")) == ["10.9.9.9"]
    assert ask(dns.reversename.from_address("100.64.0.2").to_text(), "PTR").rcode() == dns.rcode.NXDOMAIN


def test_reverse_lookups_of_overlay_addresses() -> None:
    r = ask(dns.reversename.from_address("100.64.0.1").to_text(), "PTR")
    assert values(r) == ["a.mesh."]
    assert values(ask(dns.reversename.from_address("fd00:1::1").to_text(), "PTR")) == ["a.mesh."]
    assert values(ask(dns.reversename.from_address("10.1.0.5").to_text(), "PTR")) == ["printer.mesh."]
    r = ask(dns.reversename.from_address("100.64.0.99").to_text(), "PTR")
    assert r.rcode() == dns.rcode.NXDOMAIN  # ours, held by nobody
    r = ask(dns.reversename.from_address("192.0.2.1").to_text(), "PTR")
    assert r.rcode() == dns.rcode.REFUSED  # not ours
    assert ask("64.100.in-addr.arpa", "PTR").rcode() == dns.rcode.REFUSED


def test_other_names_are_refused_never_answered_or_forwarded() -> None:
    for name in ("example.com", "mesh.example.com", "localhost", "com"):
        r = ask(name, "A")
        assert r.rcode() == dns.rcode.REFUSED and r.answer == []
        assert not r.flags & dns.flags.RA


def test_only_standard_queries_of_class_in() -> None:
    q = dns.message.make_query("a.mesh", "A")
    q.set_opcode(dns.opcode.NOTIFY)
    wire = answer(q.to_wire(), ZONE)
    assert wire is not None and dns.message.from_wire(wire).rcode() == dns.rcode.NOTIMP
    r = ask("a.mesh", "A", rdclass="CH")
    assert r.rcode() == dns.rcode.REFUSED


def test_responses_short_messages_and_garbage_get_no_answer_or_formerr() -> None:
    q = dns.message.make_query("a.mesh", "A")
    response = dns.message.make_response(q).to_wire()
    assert answer(response, ZONE) is None  # never answer an answer (no loops, no reflection)
    assert answer(b"\x12\x34\x01", ZONE) is None
    wire = answer(b"\x12\x34\x01\x00" + b"\x00\x01" + b"\x00" * 6 + b"\xff\xff", ZONE)
    assert wire is not None
    r = dns.message.from_wire(wire)
    assert r.id == 0x1234 and r.rcode() == dns.rcode.FORMERR


def test_an_answer_too_big_for_udp_is_truncated_and_whole_over_tcp() -> None:
    many = [f"100.65.{i // 256}.{i % 256}" for i in range(100)]
    zone = build("mesh", [("big", many)])
    q = dns.message.make_query("big.mesh", "A")
    udp = dns.message.from_wire(answer(q.to_wire(), zone) or b"")
    assert udp.flags & dns.flags.TC and udp.answer == []
    tcp = dns.message.from_wire(answer(q.to_wire(), zone, tcp=True) or b"")
    assert len(values(tcp)) == 100


def test_the_domain_is_the_maps_and_bad_entries_are_skipped() -> None:
    zone = build("corp.example", [("a", ["100.64.0.1/32"]), ("bad name", ["100.64.0.3/32"]), ("c", ["x"])])
    assert values(ask("a.corp.example", "A", zone)) == ["100.64.0.1"]
    assert ask("a.mesh", "A", zone).rcode() == dns.rcode.REFUSED
    assert set(zone.names) == {"a"}


label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
v4 = st.integers(min_value=1, max_value=2**22 - 2).map(
    lambda i: str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("100.64.0.0")) + i))
)


@given(st.dictionaries(label, v4, min_size=1, max_size=20))
def test_every_node_in_a_zone_resolves_both_ways(nodes: dict[str, str]) -> None:
    zone = build("mesh", [(n, [ip + "/32"]) for n, ip in nodes.items()], networks=["100.64.0.0/10"])
    owners: dict[str, str] = {}
    for n, ip in nodes.items():
        owners.setdefault(ip, n)
        assert values(ask(f"{n}.mesh", "A", zone)) == [ip]
    for ip, n in owners.items():
        assert values(ask(dns.reversename.from_address(ip).to_text(), "PTR", zone)) == [f"{n}.mesh."]


@given(st.binary(max_size=600))
def test_any_bytes_give_none_or_a_response_never_an_exception(data: bytes) -> None:
    wire = answer(data, ZONE)
    if wire is not None:
        r = dns.message.from_wire(wire)
        assert r.flags & dns.flags.QR and r.id == int.from_bytes(data[:2], "big")


@given(st.binary(min_size=1, max_size=80), st.sampled_from(["A", "AAAA", "PTR", "ANY", "TXT", "MX"]))
def test_any_question_name_gets_a_well_formed_answer(raw: bytes, rdtype: str) -> None:
    labels = [raw[i : i + 20] for i in range(0, len(raw), 20)]
    name = dns.name.Name([*labels, b"mesh", b""])
    q = dns.message.make_query(name, rdtype)
    wire = answer(q.to_wire(), ZONE)
    assert wire is not None
    assert dns.message.from_wire(wire).rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN)


# names are read without dnspython when they are plain labels (issue 15: no dnspython at start-up);
# these hold the shortcut to what dnspython itself makes of any text
name_text = st.text(alphabet="aZ09-.\\ _@*é\t", max_size=70) | st.builds(
    lambda n, size: ".".join(["x" * size] * n), st.integers(1, 6), st.integers(40, 70)
)


@given(name_text)
@example("\\065b.C")  # an escape dnspython decodes to a plain name: "ab.c"
@example("b\u00fccher")  # IDNA: "xn--bcher-kva"
@example("x" * 64)  # a label too long
@example(".".join(["x" * 63] * 3 + ["x" * 62]))  # 255 bytes: the longest relative name
@example(".".join(["x" * 63] * 4))
@example("a..b")
def test_a_name_is_read_as_dnspython_reads_it(text: str) -> None:
    from meshd.dns import wire, zone

    assert zone._key(text) == wire.key(text.strip().rstrip("."))


@given(name_text)
@example("Corp.Example.")
@example("b\u00fccher")
@example("a..b")
@example(".".join(["x" * 63] * 3 + ["x" * 61]))  # 255 bytes with the root label: the longest name
@example(".".join(["x" * 63] * 3 + ["x" * 62]))
def test_a_domain_is_taken_or_refused_as_dnspython_does(text: str) -> None:
    import dns.exception
    import dns.name

    from meshd.dns import wire

    try:
        want: dns.name.Name | None = dns.name.from_text(text or "mesh")
    except (dns.exception.DNSException, ValueError):
        want = None
    try:
        got: dns.name.Name | None = wire.origin(build(text, []).domain)
    except (dns.exception.DNSException, ValueError):
        got = None
    assert got == want
