"""Config values validate and canonicalise at construction; bad values give one-line WgConfigErrors."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.proto.endpoint import format_endpoint
from meshd.wg.errors import WgConfigError
from meshd.wg.keys import ZERO_KEY_B64, generate_private_key, public_key
from meshd.wg.model import (
    InterfaceConfig,
    PeerConfig,
    check_ifname,
    parse_endpoint,
)

PUB = public_key(generate_private_key())


def test_canonical_forms() -> None:
    p = PeerConfig(PUB, ("10.0.0.7/24", "FD00::1/64", "10.0.0.0/24"), ("fd00::0001", 5), 0, ZERO_KEY_B64)
    assert p.allowed_ips == ("10.0.0.0/24", "fd00::/64")
    assert p.endpoint == ("fd00::1", 5) and p.preshared_key is None
    cfg = InterfaceConfig("mesh0", generate_private_key(), addresses=("100.64.0.1/32", "fd7a::1/128"))
    assert cfg.addresses == ("100.64.0.1/32", "fd7a::1/128")
    assert cfg.private_key not in repr(cfg)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: PeerConfig("no pe!"), "peer public key is not valid base64"),
        (lambda: PeerConfig("AAAA"), "must decode to 32 bytes"),
        (lambda: PeerConfig(PUB, ("10.0.0.1",)), "needs a prefix length"),
        (lambda: PeerConfig(PUB, ("10.0.0.1/40",)), "is not an IP network"),
        (lambda: PeerConfig(PUB, endpoint=("example.com", 1)), "is not an IP address"),
        (lambda: PeerConfig(PUB, endpoint=("1.2.3.4", 0)), "not in 1..65535"),
        (lambda: PeerConfig(PUB, persistent_keepalive=70000), "persistent keepalive"),
        (lambda: InterfaceConfig("a/b", generate_private_key()), "invalid interface name"),
        (lambda: InterfaceConfig("x" * 16, generate_private_key()), "invalid interface name"),
        (lambda: InterfaceConfig("wg0", generate_private_key(), mtu=100), "MTU"),
        (lambda: InterfaceConfig("wg0", generate_private_key(), peers=(PeerConfig(PUB), PeerConfig(PUB))),
         "appears twice"),
    ],
)
def test_bad_values(build, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(WgConfigError, match=message) as info:
        build()
    assert "\n" not in str(info.value)


def test_endpoint_text() -> None:
    assert format_endpoint(("::1", 5)) == "[::1]:5" and parse_endpoint("[::1]:5") == ("::1", 5)
    assert parse_endpoint("10.0.0.1:51820") == ("10.0.0.1", 51820)
    for bad in ("::1:5", "10.0.0.1", "10.0.0.1:x", "[::1]:99999"):
        with pytest.raises(WgConfigError):
            parse_endpoint(bad)


@given(st.text(max_size=40))
def test_any_endpoint_or_ifname_text_raises_only_config_errors(text: str) -> None:
    for fn in (parse_endpoint, check_ifname):
        with contextlib.suppress(WgConfigError):
            fn(text)


def test_public_key_matches_wg_tool_vector() -> None:
    # from the captured `wg show dump` in test_wg_uapi.py: private f8150b6d... -> public FGgm...
    from base64 import b64encode

    raw = bytes.fromhex("f8150b6d2b9ec45db37d708c32bb485e5de7ed90c74239911a5094a8f451e14b")
    priv = b64encode(raw).decode()
    assert public_key(priv) == "FGgmgAA8AzhEgEC7oAXKzn3yUbFSCLZidYZyl3hJDis="
