"""Map format 2 (issue 16): compact peer records, certificates carried as signature and validity, and
long messages in zlib binary frames (meshd.proto.netmap)."""

from __future__ import annotations

import contextlib
import json
import zlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nacl.signing import SigningKey

from meshd.proto import cert, netmap
from meshd.proto.encoding import b64encode
from meshd.proto.netmap import Peer

SEED = bytes(range(32))
ISSUER = cert.key_id(bytes(SigningKey(SEED).verify_key))
TRUSTED = [bytes(SigningKey(SEED).verify_key)]
NOW = 1_700_000_000

texts = st.text(max_size=12)  # any Unicode, lone surrogates included
keys = st.binary(min_size=32, max_size=32).map(b64encode)


def issued(p: Peer, serial: int = 7) -> str:
    payload = cert.CertPayload(
        cert.CERT_VERSION, serial, p.name, p.node_id, p.ips, p.wg_public_key, p.node_public_key, p.tags,
        NOW - 60, NOW + 86400, ISSUER,
    )  # fmt: skip
    return cert.issue(payload, SEED)


@st.composite
def peers(draw: st.DrawFn) -> Peer:
    p = Peer(
        node_id=draw(st.integers(1, 2**40)),
        name=draw(st.text(alphabet="abcxyz-0123é", min_size=1, max_size=20)),
        ips=draw(st.sampled_from([("100.64.0.1/32", "fd7a:115c:a1e0::1/128"), ("100.64.3.9/32",), ()])),
        wg_public_key=draw(keys),
        node_public_key=draw(keys),
        cert="",
        endpoints=draw(st.lists(st.sampled_from(["1.2.3.4:5", "[2a00::1]:51820"]), max_size=2).map(tuple)),
        relay_home=draw(st.none() | st.integers(0, 9)),
        online=draw(st.booleans()),
        tags=draw(st.lists(st.sampled_from(["tag:web", "tag:db"]), max_size=2, unique=True).map(tuple)),
        routes=draw(st.sampled_from([(), ("10.1.0.0/16",), ("0.0.0.0/0", "::/0")])),
    )
    return Peer(**{**_fields(p), "cert": issued(p)})


def _fields(p: Peer) -> dict[str, Any]:
    return {f: getattr(p, f) for f in Peer.__slots__}


def roundtrip(p: Peer) -> Peer:
    return netmap.peer_from_json(json.loads(json.dumps(netmap.peer_to_json(p))))


@given(peers())
def test_a_peer_goes_out_with_its_certificate_as_signature_and_validity_and_comes_back_equal(p: Peer) -> None:
    raw = netmap.peer_to_json(p)
    serial, not_before, not_after, issuer, _sig = raw["c"]
    assert (serial, not_before, not_after, issuer) == (7, NOW - 60, NOW + 86400, ISSUER)
    back = roundtrip(p)
    assert back == p
    assert cert.verify(back.cert, TRUSTED, NOW).name == p.name  # what meshd does with it


@given(peers(), st.sampled_from(["name", "ips", "wg_public_key", "node_public_key", "tags"]))
def test_a_certificate_that_does_not_match_its_record_goes_whole(p: Peer, field: str) -> None:
    other = {"name": p.name + "x", "ips": ("100.64.9.9/32",), "wg_public_key": b64encode(b"\1" * 32),
             "node_public_key": b64encode(b"\2" * 32), "tags": ("tag:other",)}[field]  # fmt: skip
    stale = Peer(**{**_fields(p), field: other})  # the record changed, the certificate did not
    assert netmap.peer_to_json(stale)["c"] == p.cert
    assert roundtrip(stale) == stale


@given(peers(), st.sampled_from(["n", "a", "w", "k", "t"]))
def test_a_record_altered_in_transit_reassembles_a_certificate_that_does_not_verify(
    p: Peer, key: str
) -> None:
    raw = netmap.peer_to_json(p)
    raw[key] = {"n": "mallory", "a": ["100.64.6.6/32"], "w": b64encode(b"\3" * 32),
                "k": b64encode(b"\4" * 32), "t": ["tag:admin"]}[key]  # fmt: skip
    forged = netmap.peer_from_json(raw)
    with pytest.raises(cert.CertError, match="bad signature"):
        cert.verify(forged.cert, TRUSTED, NOW)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | texts,
        lambda inner: st.lists(inner, max_size=6) | st.dictionaries(texts, inner, max_size=4),
        max_leaves=12,
    ),
    st.sampled_from(["c", "n", "t", "a", "i", "o", "h", "e", "r"]),
)
def test_any_value_in_a_record_is_a_netmap_error_or_a_peer(value: object, key: str) -> None:
    p = Peer(3, "a", ("100.64.0.3/32",), b64encode(b"\5" * 32), b64encode(b"\6" * 32), "")
    raw = netmap.peer_to_json(Peer(**{**_fields(p), "cert": issued(p)}))
    raw[key] = value
    with contextlib.suppress(netmap.NetmapError):
        netmap.peer_from_json(json.loads(json.dumps(raw)))


@given(st.lists(texts, min_size=5, max_size=5), st.integers(), st.integers())
def test_a_compact_certificate_with_lone_surrogates_or_bad_parts_is_a_netmap_error(
    parts: list[str], a: int, b: int
) -> None:
    p = Peer(3, "a", (), b64encode(b"\5" * 32), b64encode(b"\6" * 32), "")
    for c in ([a, b, a, parts[0], parts[1]], [a, b, a, ISSUER, parts[2]], parts, [a, b, a, ISSUER]):
        raw = {**netmap.peer_to_json(p), "c": c, "n": parts[3], "t": [parts[4]]}
        with contextlib.suppress(netmap.NetmapError):
            netmap.peer_from_json(raw)


@given(st.text(max_size=20000))
def test_a_long_message_goes_compressed_and_comes_back_whole(text: str) -> None:
    framed = netmap.frame_server_message(text)
    if len(text) < netmap.COMPRESS_AT:
        assert framed == text
    else:
        assert isinstance(framed, bytes)
        assert netmap.inflate_frame(framed) == text


@given(st.binary(max_size=200))
def test_any_binary_frame_is_a_netmap_error_or_text(data: bytes) -> None:
    with contextlib.suppress(netmap.NetmapError):
        netmap.inflate_frame(data)


def test_a_compression_bomb_stops_at_the_bound() -> None:
    bomb = zlib.compress(b"{" * 10_000_000, 9)
    with pytest.raises(netmap.NetmapError, match="too large"):
        netmap.inflate_frame(bomb, max_bytes=1_000_000)
    with pytest.raises(netmap.NetmapError, match="one complete"):
        netmap.inflate_frame(zlib.compress(b"{}")[:-3])
    with pytest.raises(netmap.NetmapError, match="one complete"):
        netmap.inflate_frame(zlib.compress(b"{}") + b"x")


def test_a_full_map_of_1000_real_peers_is_under_250_bytes_per_peer_on_the_wire() -> None:
    """Not a timing: the size of a deterministic encoding (benchmarks/map_size.py prints the figures)."""
    ps = []
    for i in range(1, 1001):
        p = Peer(i, f"host-{i}", (f"100.64.{i >> 8}.{i & 255}/32", f"fd7a:115c:a1e0::{i:x}/128"),
                 b64encode(SigningKey.generate().encode()), b64encode(SigningKey.generate().encode()), "",
                 (f"198.51.100.{i & 255}:41641",), 1, True)  # fmt: skip
        ps.append(Peer(**{**_fields(p), "cert": issued(p, serial=i)}))
    m = netmap.NetMap(1000, ps[0], tuple(ps[1:]), (), "", "mesh")
    text = netmap.encode_signed(netmap.MapMessage(m), 1, SigningKey(SEED))
    wire = netmap.frame_server_message(text)
    assert isinstance(wire, bytes) and len(wire) <= 250 * 999
    back = netmap.decode_server_message(netmap.inflate_frame(wire))
    assert isinstance(back, netmap.MapMessage) and back.map == m
    netmap.verify(back, 1, TRUSTED)
