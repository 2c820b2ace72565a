"""The status document serialises exactly to the DESIGN.md schema and reads back."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from meshd.status import (
    CoordinatorStatus,
    NatStatus,
    PeerStatus,
    SelfStatus,
    Status,
    StatusError,
    render,
)

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
WHY_C = "a: EIM, c: EDM without port mapping: no passable port pair; enable UPnP or NAT-PMP on c's router"

STATUS = Status(
    self_=SelfStatus(
        name="a",
        ips=("100.64.0.1/32", "fd7a:115c:a1e0::1/128"),
        public_key="QUFB",
        interface="mesh0",
        backend="userspace",
        endpoints=("6.0.0.2:41641",),
        nat=NatStatus(mapping_varies_by_dest=False, portmap="upnp"),
        relay="default",
    ),
    coordinator=CoordinatorStatus(url="http://6.0.0.1:8080", connected=True),
    peers=(
        PeerStatus(
            name="b", ips=("100.64.0.2/32",), public_key="QkJC", path="direct", endpoint="6.0.0.3:41641",
            relay="default", latency_ms=1.2, last_handshake=T0, rx_bytes=0, tx_bytes=0,
        ),
        PeerStatus(
            name="c", ips=("100.64.0.3/32",), public_key="Q0ND", path="relay", relay="default",
            relay_transport="udp", why=WHY_C,
        ),
    ),
)

# DESIGN.md §2, with the example's values
DESIGN_EXAMPLE: dict[str, Any] = {
    "self": {"name": "a", "ips": ["100.64.0.1/32", "fd7a:115c:a1e0::1/128"], "public_key": "QUFB",
             "interface": "mesh0", "backend": "userspace", "endpoints": ["6.0.0.2:41641"],
             "nat": {"mapping_varies_by_dest": False, "portmap": "upnp"}, "relay": "default",
             "firewall_error": None, "dns": None,
             "routes": {"advertised": [], "approved": []}, "exit_node": None},
    "coordinator": {"url": "http://6.0.0.1:8080", "connected": True},
    "peers": [{"name": "b", "ips": ["100.64.0.2/32"], "public_key": "QkJC",
               "path": "direct", "endpoint": "6.0.0.3:41641", "relay": "default",
               "latency_ms": 1.2, "last_handshake": "2026-01-01T00:00:00Z",
               "rx_bytes": 0, "tx_bytes": 0, "routes": [], "relay_transport": None, "why": None},
              {"name": "c", "ips": ["100.64.0.3/32"], "public_key": "Q0ND",
               "path": "relay", "endpoint": None, "relay": "default",
               "latency_ms": None, "last_handshake": None, "rx_bytes": 0, "tx_bytes": 0, "routes": [],
               "relay_transport": "udp", "why": WHY_C}],
}


def test_json_is_exactly_the_design_schema() -> None:
    doc = STATUS.to_json()
    assert doc == DESIGN_EXAMPLE
    assert list(doc) == ["self", "coordinator", "peers"]
    assert json.loads(json.dumps(doc)) == doc


def test_reads_back_and_ignores_added_fields() -> None:
    doc = json.loads(json.dumps(DESIGN_EXAMPLE))
    doc["self"]["future_field"] = 1
    doc["peers"][0]["also_new"] = "x"
    assert Status.from_json(doc) == STATUS


def test_a_firewall_error_is_shown_and_read_back() -> None:
    """Fail closed (issue 13): when nft fails no peer is configured, and status says why."""
    failed = dataclasses.replace(STATUS, self_=dataclasses.replace(STATUS.self_, firewall_error="nft: boom"))
    doc = json.loads(json.dumps(failed.to_json()))
    assert doc["self"]["firewall_error"] == "nft: boom"
    assert Status.from_json(doc) == failed


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("self"), "self must be an object"),
        (lambda d: d["peers"][0].update(path="sideways"), "path must be one of direct, relay, none"),
        (lambda d: d["peers"][0].update(rx_bytes="1"), r"peers\[0\].rx_bytes must be a int"),
        (lambda d: d["peers"][0].update(last_handshake="yesterday"), "not a time"),
        (lambda d: d["coordinator"].update(connected=1), "connected must be a bool"),
        (lambda d: d.update(peers={}), "peers must be a list"),
    ],
)
def test_bad_documents_are_status_errors(mutate: Any, message: str) -> None:
    doc = json.loads(json.dumps(DESIGN_EXAMPLE))
    mutate(doc)
    with pytest.raises(StatusError, match=message):
        Status.from_json(doc)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@given(json_values, st.sampled_from(["self", "coordinator", "peers", "nat", "peer"]))
def test_any_document_reads_or_raises_status_error(value: object, where: str) -> None:
    doc = json.loads(json.dumps(DESIGN_EXAMPLE))
    if where == "nat":
        doc["self"]["nat"] = value
    elif where == "peer":
        doc["peers"][0] = value
    else:
        doc[where] = value
    with contextlib.suppress(StatusError):
        Status.from_json(doc)


def test_table_shows_each_peer_and_its_path() -> None:
    console = Console(width=120, record=True, color_system=None)
    console.print(render(STATUS, now=T0 + dt.timedelta(seconds=5)))
    out = console.export_text()
    assert "mesh0 (userspace)" in out and "connected" in out
    b = next(line for line in out.splitlines() if line.startswith("b "))
    assert "direct" in b and "6.0.0.3:41641" in b and "1.2 ms" in b and "5s ago" in b
    c = next(line for line in out.splitlines() if line.startswith("c "))
    assert "relay" in c and "never" in c


def test_table_without_peers() -> None:
    console = Console(width=100, record=True, color_system=None)
    console.print(render(Status(STATUS.self_, STATUS.coordinator)))
    assert "no peers yet" in console.export_text()
