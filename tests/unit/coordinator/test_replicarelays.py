"""A relay region per replica (coordinator/replicarelays.py): the id a replica takes, the relay map it
serves, the setting."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator import replicarelays
from coordinator.replicarelays import RegionConflict, choose_id, merged
from coordinator.settings import SettingsError, load_settings
from meshd.proto.netmap import RelayRegion

URL1, URL2, URL3 = "http://192.0.2.1:8080", "http://192.0.2.2:8080", "http://192.0.2.3:8080"


def region(i: int, url: str) -> RelayRegion:
    return RelayRegion(i, replicarelays.region_name(i), url, 3478)


def test_the_first_replica_is_region_1_and_the_next_ones_count_from_1001_kept_in_the_state_dir(
    tmp_path: Path,
) -> None:
    for d in ("a", "b", "c"):
        (tmp_path / d).mkdir()
    assert choose_id(0, tmp_path / "a", URL1, {}) == 1
    assert choose_id(0, tmp_path / "b", URL2, {1: region(1, URL1)}) == 1001
    held = {1: region(1, URL1), 1001: region(1001, URL2)}
    assert choose_id(0, tmp_path / "c", URL3, held) == 1002
    # stable: a restart keeps the id, even when region 1 is free by then
    assert choose_id(0, tmp_path / "b", URL2, {}) == 1001
    assert (tmp_path / "b" / replicarelays.REGION_FILE).read_text() == "1001\n"


def test_a_held_id_at_our_own_url_is_our_previous_life(tmp_path: Path) -> None:
    assert choose_id(0, tmp_path, URL1, {1: region(1, URL1)}) == 1
    assert choose_id(5, tmp_path, URL1, {5: region(5, URL1)}) == 5


def test_a_kept_id_another_replica_took_is_given_up_and_a_configured_one_is_refused(tmp_path: Path) -> None:
    (tmp_path / replicarelays.REGION_FILE).write_text("1001\n")
    assert choose_id(0, tmp_path, URL3, {1001: region(1001, URL2), 1: region(1, URL1)}) == 1002
    with pytest.raises(RegionConflict, match=f"relay region 5 is held by the live replica at {URL2}"):
        choose_id(5, tmp_path, URL1, {5: region(5, URL2)})


def test_the_relay_map_is_our_regions_and_the_live_replicas_ours_winning_a_clash() -> None:
    embedded, standalone = region(1, URL1), RelayRegion(2, "near", "http://198.51.100.1:8443", 3478)
    other, gone = region(1001, URL2), region(1002, URL3)
    relays = merged((embedded, standalone, gone), (1002,), {1001: other, 1: region(1, URL2)})
    assert relays == (embedded, standalone, other)


@given(st.text(max_size=200))
def test_a_row_that_does_not_parse_is_left_out(text: str) -> None:
    found = replicarelays.decode(text)
    assert found is None or isinstance(found, RelayRegion)


def test_the_setting() -> None:
    assert load_settings({"relay_region_id": "7"}, {}).relay_region_id == 7
    assert load_settings({}, {"COORDINATOR_RELAY_REGION_ID": "9"}).relay_region_id == 9
    assert load_settings({}, {}).relay_region_id == 0
    with pytest.raises(SettingsError, match="--relay-region-id"):
        load_settings({"relay_region_id": -1}, {})
