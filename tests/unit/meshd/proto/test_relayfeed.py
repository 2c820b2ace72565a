"""The standalone-relay feed: every message round-trips, each end reads only its direction, the wire format
is the one deployed relays speak, and any input raises only FeedError."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.proto import relayfeed as feed
from meshd.proto.netmap import RelayRegion

ids = st.integers(0, feed.MAX_ID)
texts = st.text(max_size=60)
keys = st.binary(min_size=32, max_size=32)
seconds = st.floats(0, 1e10, allow_nan=False)
ZERO_KEY = "A" * 43 + "="  #: 32 zero bytes, base64

to_relay = st.one_of(
    st.builds(feed.Keys, st.lists(keys, max_size=5).map(tuple)),
    st.builds(feed.Valid, st.dictionaries(ids, keys, max_size=20)),
    st.builds(feed.Revoke, ids, texts),
    st.builds(feed.Rekeyed, ids, keys),
)
urls = st.sampled_from(["http://127.0.0.1:8080", "https://relay.example.com", "http://[::1]:1/"])
region_names = st.text(min_size=1, max_size=60).filter(str.isprintable)
to_coordinator = st.one_of(
    st.builds(
        feed.Region,
        st.builds(RelayRegion, st.integers(1, (1 << 31) - 1), region_names, urls, st.integers(0, 65534)),
    ),
    st.builds(feed.Attach, ids, ids),
    st.builds(feed.SessionOpen, ids, texts, texts),
    st.builds(feed.SessionRecord, ids, keys, texts, texts, seconds, seconds, ids, ids, ids, texts),
)


@given(to_relay)
def test_coordinator_to_relay_roundtrip(msg: feed.ToRelay) -> None:
    assert feed.decode_to_relay(feed.encode(msg)) == msg


@given(to_coordinator)
def test_relay_to_coordinator_roundtrip(msg: feed.ToCoordinator) -> None:
    assert feed.decode_to_coordinator(feed.encode(msg)) == msg


@given(to_relay)
def test_the_coordinator_refuses_its_own_messages(msg: feed.ToRelay) -> None:
    with pytest.raises(feed.FeedError, match="not a relay -> coordinator message"):
        feed.decode_to_coordinator(feed.encode(msg))


@given(to_coordinator)
def test_a_relay_refuses_its_own_messages(msg: feed.ToCoordinator) -> None:
    with pytest.raises(feed.FeedError, match="not a coordinator -> relay message"):
        feed.decode_to_relay(feed.encode(msg))


def test_wire_format_is_what_deployed_relays_speak() -> None:
    """Coordinator and standalone relays are upgraded one at a time: the JSON shapes must not drift."""
    key = bytes(range(32))
    record = feed.SessionRecord(7, key, "r2", "upgrade", 1000.5, 2.0, 10, 20, 0, "client closed")
    assert json.loads(feed.encode(record)) == {
        "type": "session",
        "record": {
            "node_id": 7,
            "key": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
            "region": "r2",
            "transport": "upgrade",
            "opened": 1000.5,
            "duration": 2.0,
            "rx_bytes": 10,
            "tx_bytes": 20,
            "drops": 0,
            "reason": "client closed",
        },
    }
    region = feed.Region(RelayRegion(2, "r2", "http://10.0.0.2:8443", 3478))
    assert json.loads(feed.encode(region)) == {
        "type": "region",
        "id": 2,
        "name": "r2",
        "url": "http://10.0.0.2:8443",
        "stun_port": 3478,
    }
    assert json.loads(feed.encode(feed.Valid({3: key, 1: bytes(32)}))) == {
        "type": "valid",
        "nodes": [[1, ZERO_KEY], [3, "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="]],
    }
    assert json.loads(feed.encode(feed.Rekeyed(3, key))) == {
        "type": "rekeyed",
        "node_id": 3,
        "key": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
    }
    assert feed.decode('{"type": "revoke", "node_id": 4, "reason": "removed", "later": 1}') == feed.Revoke(
        4, "removed"
    )


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("[]", "not a JSON object"),
        ("{", "not JSON"),
        ('{"type": "gossip"}', "unknown message type 'gossip'"),
        ('{"type": "keys", "trusted": ["AAAA"]}', "must be 32 bytes"),
        ('{"type": "keys", "trusted": "AAAA"}', "must be list"),
        ('{"type": "valid", "nodes": [[-2, "' + ZERO_KEY + '"]]}', "non-negative integer"),
        ('{"type": "valid", "nodes": [[true, "' + ZERO_KEY + '"]]}', "non-negative integer"),
        ('{"type": "valid", "nodes": [[1]]}', "each node must be"),
        ('{"type": "valid", "nodes": [[1, "AAAA"]]}', "must be 32 bytes"),
        ('{"type": "rekeyed", "node_id": 1, "key": "AAAA"}', "must be 32 bytes"),
        ('{"type": "revoke", "node_id": 1}', "field reason must be str"),
        ('{"type": "region", "id": 2, "name": "r", "url": "http://h", "stun_port": 70000}', "stun_port"),
        ('{"type": "region", "id": 2, "name": "r", "url": "http://[", "stun_port": 0}', "url does not parse"),
        ('{"type": "region", "id": 2, "name": "r", "url": "u", "stun_port": 0}', "http\\(s\\)://host"),
        ('{"type": "region", "id": 0, "name": "r", "url": "http://h", "stun_port": 0}', "id must be"),
        ('{"type": "region", "id": 2, "name": "", "url": "http://h", "stun_port": 0}', "name must be"),
        ('{"type": "attach", "node_id": 1.5, "region_id": 2}', "non-negative integer"),
        ('{"type": "session", "record": []}', "field record must be dict"),
        ('{"type": "session", "record": {"node_id": 1}}', "key"),
        ('{"type": "attach", "node_id": ' + "9" * 5000 + ', "region_id": 2}', "not JSON"),
    ],
)
def test_malformed_messages_say_what_is_wrong(text: str, error: str) -> None:
    with pytest.raises(feed.FeedError, match=error):
        feed.decode(text)


def test_session_times_must_be_finite_and_bounded() -> None:
    good = json.loads(feed.encode(feed.SessionRecord(1, bytes(32), "r", "upgrade", 1.0, 1.0, 0, 0, 0, "x")))
    for bad in (1e400, -1, "1", True, 10**30):
        good["record"]["duration"] = bad
        with pytest.raises(feed.FeedError, match="duration"):
            feed.decode(json.dumps(good))


def test_oversized_message_is_refused_before_parsing() -> None:
    with pytest.raises(feed.FeedError, match="larger than"):
        feed.decode(" " * (feed.MAX_MESSAGE_BYTES + 1))


@given(st.one_of(st.binary(max_size=300), st.text(max_size=300)))
def test_any_input_raises_only_feed_error(data: bytes | str) -> None:
    with contextlib.suppress(feed.FeedError):
        feed.decode(data)


FIELDS: tuple[str, ...] = (
    "trusted",
    "nodes",
    "node_id",
    "reason",
    "id",
    "name",
    "url",
    "stun_port",
    "region_id",
)
FIELDS += ("region", "transport", "record", "key", "opened", "duration", "rx_bytes", "tx_bytes", "drops")
json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


@given(
    st.sampled_from(["keys", "valid", "revoke", "rekeyed", "region", "attach", "open", "session"]),
    st.dictionaries(
        st.sampled_from(FIELDS),
        json_values,
    ),
)
def test_any_json_of_a_known_type_raises_only_feed_error(kind: str, fields: dict[str, object]) -> None:
    with contextlib.suppress(feed.FeedError):
        feed.decode(json.dumps({"type": kind, **fields}))
    with contextlib.suppress(feed.FeedError):
        feed.decode(json.dumps({"type": "session", "record": fields}))
