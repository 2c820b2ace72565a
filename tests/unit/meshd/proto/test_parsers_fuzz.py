"""Every parser raises only its own error type (issue 13): inputs shaped to get past the first checks,
where plain random bytes rarely reach (PCP and NAT-PMP bodies behind a valid header, endpoint candidates
in the map codec, the UAPI encoder fed any endpoint host)."""

from __future__ import annotations

import contextlib
import json

from hypothesis import given
from hypothesis import strategies as st

from meshd.proto import cmm, natpmp, netmap
from meshd.wg import uapi
from meshd.wg.diff import UpdatePeer
from meshd.wg.errors import WgConfigError

KEY = "mFxBxcJ4oxo0WIEHGTb4Cdk8rOpBc+pIxe2WcaPwtms="


@given(
    st.sampled_from([0, 2]),
    st.sampled_from([0x80, 0x81, 0x82, 0x83, 0x01, 0x7F, 0xFF]),
    st.binary(max_size=80),
)
def test_natpmp_and_pcp_bodies_raise_only_portmap_error(version: int, op: int, body: bytes) -> None:
    with contextlib.suppress(natpmp.PortMapError):
        natpmp.decode_response(bytes([version, op]) + body)


candidate_text = st.one_of(
    st.text(max_size=70),
    st.builds(
        lambda ip, port, extra: f"[{ip}{extra}]:{port}" if ":" in str(ip) else f"{ip}{extra}:{port}",
        st.ip_addresses(),
        st.integers(-5, 70000),
        st.sampled_from(["", "%eth0", "%x\nremove=true", "\r", "\x1b"]),
    ),
)


@given(candidate_text)
def test_candidates_are_canonical_or_netmap_error(text: str) -> None:
    try:
        got = netmap.canonical_candidate(text)
    except netmap.NetmapError:
        return
    assert got.isprintable() and "%" not in got
    assert netmap.canonical_candidate(got) == got, "canonical spelling is a fixed point"
    assert cmm.parse_endpoint(got)  # what the coordinator passes, peers take


@given(st.lists(candidate_text, max_size=4))
def test_client_messages_raise_only_netmap_error(candidates: list[str]) -> None:
    with contextlib.suppress(netmap.NetmapError):
        msg = netmap.decode_client_message(json.dumps({"type": "endpoints", "candidates": candidates}))
        assert isinstance(msg, netmap.EndpointsMessage)
        assert all(c.isprintable() and "%" not in c for c in msg.candidates)


@given(candidate_text)
def test_call_me_maybe_candidates_raise_only_its_error(text: str) -> None:
    with contextlib.suppress(cmm.CallMeMaybeError):
        host, _ = cmm.parse_endpoint(text)
        assert "%" not in host and host.isprintable()


@given(st.text(max_size=60), st.integers(0, 70000))
def test_uapi_encoder_never_emits_an_extra_line(host: str, port: int) -> None:
    """Whatever endpoint an UpdatePeer carries: WgConfigError, or a request of exactly its own lines."""
    try:
        text = uapi.encode_set([UpdatePeer(KEY, endpoint=(host, port))]).decode()
    except WgConfigError:
        return
    assert text.count("\n") == 5 and text.endswith("\n\n")
