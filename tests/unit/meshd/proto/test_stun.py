"""STUN codec: RFC 5769 vectors, round trips, and robustness against arbitrary bytes."""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.proto import stun

VECTORS = Path(__file__).parents[3] / "data" / "rfc5769.txt"
SHORT_TERM = b"VOkJxbRl1RmTxUk/WvJxBt"


def _vectors() -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    name = ""
    for line in VECTORS.read_text().splitlines():
        if line.startswith("# ["):
            name = line[3:6]
            out[name] = b""
        elif line and not line.startswith("#"):
            out[name] += bytes.fromhex(line)
    return out


V = _vectors()


def test_sample_request_2_1() -> None:
    msg = stun.decode(V["2.1"], integrity_key=SHORT_TERM)
    assert (msg.method, msg.cls) == (stun.Method.BINDING, stun.Class.REQUEST)
    assert msg.transaction_id == bytes.fromhex("b7e7a701bc34d686fa87dfae")
    assert msg.software == "STUN test client"
    assert msg.get(stun.Attr.USERNAME) == b"evtj:h6vY"
    assert msg.get(stun.Attr.PRIORITY) == bytes.fromhex("6e0001ff")


@pytest.mark.parametrize(
    ("name", "addr"),
    [("2.2", ("192.0.2.1", 32853)), ("2.3", ("2001:db8:1234:5678:11:2233:4455:6677", 32853))],
)
def test_sample_responses(name: str, addr: tuple[str, int]) -> None:
    msg = stun.decode(V[name], integrity_key=SHORT_TERM)
    assert msg.cls == stun.Class.SUCCESS
    assert msg.software == "test vector"
    assert msg.xor_mapped_address == addr
    assert msg.mapped_address == addr


def test_long_term_auth_2_4() -> None:
    username = "\u30de\u30c8\u30ea\u30c3\u30af\u30b9"
    key = hashlib.md5(f"{username}:example.org:TheMatrIX".encode()).digest()
    msg = stun.decode(V["2.4"], integrity_key=key)
    assert msg.get(stun.Attr.USERNAME) == username.encode()
    assert msg.get(stun.Attr.REALM) == b"example.org"
    assert msg.get(stun.Attr.NONCE) == b"f//499k954d6OL34oL9FSTvy64sA"


def test_wrong_password_and_flipped_bit_are_rejected() -> None:
    with pytest.raises(stun.StunError, match="MESSAGE-INTEGRITY mismatch"):
        stun.decode(V["2.2"], integrity_key=b"wrong")
    data = bytearray(V["2.2"])
    data[45] ^= 1  # inside XOR-MAPPED-ADDRESS: FINGERPRINT must catch it
    with pytest.raises(stun.StunError, match="FINGERPRINT mismatch"):
        stun.decode(bytes(data))


def test_reencoding_the_vectors_reproduces_integrity_and_fingerprint() -> None:
    """Our encoder computes the same HMAC and CRC as the RFC when the padding bytes agree.

    The vectors pad with spaces (allowed: padding content is arbitrary), so compare after re-decoding.
    """
    for name in ("2.1", "2.2", "2.3"):
        msg = stun.decode(V[name])
        body = tuple(
            (t, v) for t, v in msg.attributes if t not in (stun.Attr.MESSAGE_INTEGRITY, stun.Attr.FINGERPRINT)
        )
        again = stun.encode(
            stun.Message(msg.method, msg.cls, msg.transaction_id, body),
            integrity_key=SHORT_TERM,
            fingerprint=True,
        )
        assert len(again) == len(V[name])
        assert stun.decode(again, integrity_key=SHORT_TERM).attributes[: len(body)] == body


def test_message_type_interleaving() -> None:
    assert stun.message_type(stun.Method.BINDING, stun.Class.REQUEST) == 0x0001
    assert stun.message_type(stun.Method.BINDING, stun.Class.SUCCESS) == 0x0101
    assert stun.message_type(stun.Method.BINDING, stun.Class.ERROR) == 0x0111
    assert stun.message_type(stun.Method.BINDING, stun.Class.INDICATION) == 0x0011


def test_server_answer_reports_the_observed_address() -> None:
    txid = stun.new_transaction_id()
    reply = stun.answer(
        stun.binding_request(txid, software="meshd"), ("6.0.0.2", 41641), other_address=("6.0.0.1", 3479)
    )
    assert reply is not None
    msg = stun.decode(reply)
    assert msg.transaction_id == txid and msg.cls == stun.Class.SUCCESS
    assert msg.xor_mapped_address == ("6.0.0.2", 41641)
    assert msg.other_address == ("6.0.0.1", 3479)
    assert stun.answer(b"\x01\x00\x00\x00" + bytes(28), ("1.2.3.4", 5)) is None  # a WireGuard initiation


def test_unknown_comprehension_required_attribute_gets_420() -> None:
    txid = stun.new_transaction_id()
    req = stun.encode(stun.Message(stun.Method.BINDING, stun.Class.REQUEST, txid, ((0x7777, b"x"),)))
    reply = stun.answer(req, ("1.2.3.4", 5))
    assert reply is not None and stun.decode(reply).error == (420, "Unknown Attribute")


def test_client_retransmits_then_fails_and_succeeds_on_answer() -> None:
    c = stun.BindingClient(rto=0.1, max_sends=3)
    server = ("6.0.0.1", 3478)
    c.query(server, now=0.0)
    sends = []
    now = 0.0
    for _ in range(20):
        sends += c.datagrams_to_send(now)
        c.handle_timer(now)
        t = c.next_timer()
        if t is None:
            break
        now = max(now, t)
    assert len(sends) == 3
    ev = c.next_event()
    assert isinstance(ev, stun.BindingFailed) and "no answer after 3" in ev.reason

    c.query(server, now=10.0)
    [(req, dst)] = c.datagrams_to_send(10.0)
    assert dst == server
    reply = stun.answer(req, ("7.0.0.9", 1234))
    assert reply is not None
    assert c.receive(reply, server, now=10.05)
    ev = c.next_event()
    assert isinstance(ev, stun.BindingSucceeded)
    assert ev.mapped == ("7.0.0.9", 1234) and abs(ev.rtt - 0.05) < 1e-9
    assert c.pending == 0 and c.next_timer() is None
    assert not c.receive(reply, server, now=10.1), "a duplicate answer is ignored"


addresses = st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str)).flatmap(
    lambda ip: st.tuples(st.just(ip), st.integers(0, 65535))
)
attr_values = st.lists(st.tuples(st.integers(0x8030, 0xFFFF), st.binary(max_size=40)), max_size=5)


@given(st.binary(min_size=12, max_size=12), addresses, attr_values, st.booleans())
def test_roundtrip(txid: bytes, addr: tuple[str, int], extra: list[tuple[int, bytes]], fp: bool) -> None:
    attrs = ((stun.Attr.XOR_MAPPED_ADDRESS, stun.encode_address(addr, txid, xor=True)), *extra)
    msg = stun.Message(stun.Method.BINDING, stun.Class.SUCCESS, txid, attrs)
    data = stun.encode(msg, fingerprint=fp)
    back = stun.decode(data)
    assert back.xor_mapped_address == (str(ipaddress.ip_address(addr[0])), addr[1])
    assert back.attributes[: len(attrs)] == attrs


@given(st.binary(max_size=200))
def test_any_bytes_raise_only_stun_error(data: bytes) -> None:
    with contextlib.suppress(stun.StunError):
        stun.decode(data)


@given(st.binary(max_size=120))
def test_any_body_behind_a_valid_header_raises_only_stun_error(body: bytes) -> None:
    body = body[: len(body) - len(body) % 4]
    header = bytes.fromhex("0101") + len(body).to_bytes(2, "big") + bytes.fromhex("2112a442") + bytes(12)
    try:
        msg = stun.decode(header + body)
        msg.mapped_address, msg.other_address, msg.error  # noqa: B018
    except stun.StunError:
        pass


def _pending_client() -> tuple[stun.BindingClient, bytes]:
    c = stun.BindingClient(rto=0.1, max_sends=3)
    c.query(("6.0.0.1", 3478), now=0.0)
    [(req, _)] = c.datagrams_to_send(0.0)
    return c, req[8:20]


def test_truncated_error_code_is_a_failed_binding_not_an_exception() -> None:
    """Used to raise StunError out of BindingClient.receive (and kill meshd's NAT timer task)."""
    c, txid = _pending_client()
    bad = stun.Message(stun.Method.BINDING, stun.Class.ERROR, txid, ((stun.Attr.ERROR_CODE, b"\x00\x04"),))
    assert c.receive(stun.encode(bad), ("6.0.0.1", 3478), now=0.01)
    ev = c.next_event()
    assert isinstance(ev, stun.BindingFailed) and "malformed error response" in ev.reason


@given(st.sampled_from([stun.Class.SUCCESS, stun.Class.ERROR]), st.binary(max_size=120))
def test_binding_client_receive_never_raises(cls: stun.Class, body: bytes) -> None:
    """Any answer to a pending transaction (any attribute bytes) is taken without raising."""
    c, txid = _pending_client()
    body = body[: len(body) - len(body) % 4]
    kind = stun.message_type(stun.Method.BINDING, cls)
    data = kind.to_bytes(2, "big") + len(body).to_bytes(2, "big") + bytes.fromhex("2112a442") + txid + body
    c.receive(data, ("6.0.0.1", 3478), now=0.01)
