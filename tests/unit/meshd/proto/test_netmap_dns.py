"""Admin DNS records in the map (``dns``, issue 17): additive (a map without records keeps its bytes),
carried by deltas, strict on decode."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.proto import netmap
from meshd.proto.netmap import NetMap
from tests.unit.meshd.proto.test_netmap import maps

label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
record_names = st.lists(label, min_size=1, max_size=3).map(".".join)
addresses = st.ip_addresses().map(str)
records = st.dictionaries(record_names, addresses, max_size=5).map(lambda d: tuple(sorted(d.items())))


@given(maps(), records, records)
def test_records_survive_diff_apply_and_the_json_codec(
    m: NetMap, a: tuple[tuple[str, str], ...], b: tuple[tuple[str, str], ...]
) -> None:
    old, new = replace(m, dns_records=a), replace(m, version=m.version + 1, dns_records=b)
    d = netmap.diff(old, new)
    assert (d.dns_records is None) == (a == b)
    assert netmap.apply(old, d) == new
    text = netmap.encode_server_message(netmap.DeltaMessage(d))
    assert netmap.decode_server_message(text) == netmap.DeltaMessage(d)
    text = netmap.encode_server_message(netmap.MapMessage(new))
    assert netmap.decode_server_message(text) == netmap.MapMessage(new)


@given(maps())
def test_a_map_without_records_has_no_dns_key(m: NetMap) -> None:
    assert "dns" not in netmap.map_to_json(m)
    assert netmap.map_from_json(netmap.map_to_json(m)).dns_records == ()


def test_removing_the_last_record_is_an_empty_list_in_the_delta() -> None:
    m = netmap.map_from_json(
        json.loads(
            '{"version": 1, "self": {"i": 1, "n": "a", "a": [], "w": "k", "k": "n", "c": "c"},'
            ' "peers": [], "relays": [], "domain": "mesh",'
            ' "dns": [{"name": "printer", "ip": "10.1.0.5"}]}'
        )
    )
    assert m.dns_records == (("printer", "10.1.0.5"),)
    d = netmap.diff(m, replace(m, version=2, dns_records=()))
    assert netmap.delta_to_json(d)["dns"] == []


@pytest.mark.parametrize(
    "bad",
    [
        [{"name": "Printer", "ip": "10.1.0.5"}],
        [{"name": "a..b", "ip": "10.1.0.5"}],
        [{"name": "x\nevil", "ip": "10.1.0.5"}],
        [{"name": "printer", "ip": "010.1.0.5"}],
        [{"name": "printer", "ip": "FD00::1"}],
        [{"name": "printer"}],
        [{"name": "p", "ip": "10.0.0.1"}] * 1025,
        {"name": "printer"},
    ],
)
def test_bad_records_are_refused(bad: object) -> None:
    raw = netmap.map_to_json(NetMap(1, netmap.Peer(1, "a", (), "k", "n", "c"), (), (), "", "mesh"))
    raw["dns"] = bad
    with pytest.raises(netmap.NetmapError):
        netmap.map_from_json(raw)
