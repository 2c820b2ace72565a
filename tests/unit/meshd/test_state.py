"""meshd's state dir: keys made on first start, enrollment persisted atomically, clear errors."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl.public import PrivateKey

from meshd.control import Enrollment, NodeKeys
from meshd.state import NodeState, StateDir, StateError, decode_state, encode_state

ENROLLMENT = Enrollment(
    node_id=7,
    name="a",
    ips=("100.64.0.1/32", "fd7a:115c:a1e0::1/128"),
    cert="opaque-cert",
    coordinator_public_key=b"\x01" * 32,
    trusted_keys=(b"\x01" * 32, b"\x02" * 32),
    domain="mesh",
    ipv4_prefix="100.64.0.0/10",
    ipv6_prefix="fd7a:115c:a1e0::/48",
)


def test_first_start_makes_private_dir_and_keys(tmp_path: Path) -> None:
    sd = StateDir(tmp_path / "meshd")
    state = sd.load_or_create()
    assert stat.S_IMODE(sd.path.stat().st_mode) == 0o700
    assert stat.S_IMODE(sd.state_file.stat().st_mode) == 0o600
    assert not state.enrolled
    assert len(state.keys.wg_private) == 32 and len(state.keys.node_private) == 32
    assert bytes(PrivateKey(state.keys.wg_private).public_key) == state.keys.wg_public
    assert sd.load_or_create() == state  # second start: same keys
    assert sd.socket_path == sd.path / "meshd.sock"


def test_two_hosts_get_different_keys(tmp_path: Path) -> None:
    a = StateDir(tmp_path / "a").load_or_create()
    b = StateDir(tmp_path / "b").load_or_create()
    assert a.keys.wg_private != b.keys.wg_private
    assert a.keys.node_private != b.keys.node_private


def test_enrollment_cert_and_rotation_persist(tmp_path: Path) -> None:
    sd = StateDir(tmp_path / "s")
    state = sd.load_or_create().with_enrollment("http://coord:8080", ENROLLMENT)
    sd.save(state)
    assert sd.load() == state
    renewed = state.with_cert("newer-cert")
    sd.save(renewed)
    loaded = sd.load()
    assert loaded is not None and loaded.enrollment is not None
    assert loaded.enrollment.cert == "newer-cert"
    assert loaded.coordinator_url == "http://coord:8080"
    rotated = loaded.with_wireguard_key(NodeKeys.generate().wg_private)
    sd.save(rotated)
    assert sd.load() == rotated
    assert rotated.keys.node_private == state.keys.node_private
    assert [p.name for p in sd.path.iterdir()] == ["state.json"]  # no temporary files left


def test_a_pending_wireguard_key_round_trips_and_older_files_have_none(tmp_path: Path) -> None:
    sd = StateDir(tmp_path / "s")
    state = sd.load_or_create().with_enrollment("http://coord:8080", ENROLLMENT)
    sd.save(state)
    raw = json.loads(sd.state_file.read_bytes())
    assert "pending_wireguard_private_key" not in raw  # the usual file is unchanged
    assert decode_state(sd.state_file.read_bytes()).pending_wg_private is None  # files from older meshd
    pending = NodeKeys.generate().wg_private
    sd.save(state.with_pending_wireguard_key(pending))
    loaded = sd.load()
    assert loaded is not None and loaded.pending_wg_private == pending
    assert loaded.keys == state.keys  # the current key stays current until the rotation settles
    assert repr(pending) not in repr(loaded)  # a private key is never in a repr
    adopted = loaded.with_wireguard_key(pending)
    sd.save(adopted)
    again = sd.load()
    assert again == adopted and again.pending_wg_private is None and again.keys.wg_private == pending
    sd.save(loaded.with_pending_wireguard_key(None))
    assert sd.load() == state


def test_a_malformed_pending_key_is_corrupt(tmp_path: Path) -> None:
    sd = StateDir(tmp_path / "s")
    doc = json.loads(encode_state(sd.load_or_create()))
    doc["pending_wireguard_private_key"] = "c2hvcnQ="
    sd.state_file.write_text(json.dumps(doc))
    with pytest.raises(StateError, match="corrupt"):
        sd.load()


def test_cert_before_enrollment_is_refused() -> None:
    with pytest.raises(StateError):
        NodeState(NodeKeys.generate()).with_cert("x")


def test_corrupt_file_says_what_to_do(tmp_path: Path) -> None:
    sd = StateDir(tmp_path / "s")
    sd.load_or_create()
    sd.state_file.write_text('{"version": 1, "wireguard_private_key": "AAAA"')
    with pytest.raises(StateError) as err:
        sd.load_or_create()
    msg = str(err.value)
    assert msg.startswith(f"state file {sd.state_file} is corrupt (")
    assert msg.endswith("move it away to re-enroll")
    assert "\n" not in msg


def test_wrong_key_length_is_corrupt(tmp_path: Path) -> None:
    sd = StateDir(tmp_path / "s")
    doc = json.loads(encode_state(NodeState(NodeKeys.generate())))
    doc["node_private_key"] = "AAAA"
    sd.ensure()
    fd = os.open(sd.state_file, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, json.dumps(doc).encode())
    os.close(fd)
    with pytest.raises(StateError, match="node key must be 32 bytes"):
        sd.load()


def test_state_file_open_to_others_is_refused(tmp_path: Path) -> None:
    sd = StateDir(tmp_path / "s")
    sd.load_or_create()
    sd.state_file.chmod(0o644)
    with pytest.raises(StateError, match=r"mode 0644\); run `chmod 600 "):
        sd.load()


def test_state_dir_open_to_others_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "s"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    with pytest.raises(StateError, match="chmod 700"):
        StateDir(d).load_or_create()


def test_someone_elses_state_dir_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to chown")
    d = tmp_path / "s"
    d.mkdir(mode=0o700)
    os.chown(d, 65534, 65534)
    with pytest.raises(StateError, match="belongs to uid 65534"):
        StateDir(d).ensure()


def test_symlinked_state_file_is_refused(tmp_path: Path) -> None:
    sd = StateDir(tmp_path / "s")
    sd.ensure()
    (tmp_path / "elsewhere").write_text("{}")
    sd.state_file.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StateError, match="cannot read state file"):
        sd.load()


def test_unwritable_dir_is_a_state_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StateError, match="cannot create state dir"):
        StateDir(tmp_path / "file" / "sub").load_or_create()


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_any_bytes_decode_or_raise_value_error(data: bytes) -> None:
    with contextlib.suppress(ValueError):
        decode_state(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)
fields = [
    "version", "wireguard_private_key", "node_private_key", "coordinator_url", "enrollment",
    "pending_wireguard_private_key",
]


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.sampled_from(fields),
    json_values,
    st.sampled_from([None, "node_id", "ips", "trusted_keys", "cert"]),
    st.binary(max_size=64),
)
def test_any_state_file_loads_or_raises_state_error(
    tmp_path: Path, field: str, value: object, subfield: str | None, junk: bytes
) -> None:
    """Valid documents with one field replaced, and arbitrary bytes: StateError only, never a traceback."""
    sd = StateDir(tmp_path / "h")
    sd.ensure()
    doc = json.loads(encode_state(NodeState(NodeKeys.generate()).with_enrollment("http://c", ENROLLMENT)))
    if subfield is not None and field == "enrollment":
        doc["enrollment"][subfield] = value
    else:
        doc[field] = value
    for data in (json.dumps(doc).encode(), junk):
        fd = os.open(sd.state_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, data)
        os.close(fd)
        try:
            sd.load()
        except StateError as exc:
            assert "\n" not in str(exc)


def test_one_daemon_per_state_dir(tmp_path: Path) -> None:
    sd = StateDir(tmp_path / "s")
    with sd.lock(), pytest.raises(StateError, match=r"another meshd is using .*; stop it first"):
        StateDir(tmp_path / "s").lock()
    with sd.lock():  # released: a restart gets it again
        pass
    assert stat.S_IMODE((sd.path / "lock").stat().st_mode) == 0o600
