"""The relay client's pure decisions: home by latency, which regions need a link, where a packet goes,
when the home region is given up."""

from __future__ import annotations

from meshd.relay import home


def test_home_is_the_fastest_once_every_region_answered() -> None:
    assert home.pick_home({1: 0.030, 2: 0.010}, {1, 2}, elapsed=0.1) == 2


def test_home_waits_for_the_others_until_decide_after() -> None:
    assert home.pick_home({1: 0.030}, {1, 2}, elapsed=0.1) is None
    assert home.pick_home({1: 0.030}, {1, 2}, elapsed=home.DECIDE_AFTER) == 1


def test_equal_round_trips_pick_the_lowest_id() -> None:
    assert home.pick_home({3: 0.01, 2: 0.01}, {2, 3}, elapsed=0.0) == 2


def test_with_nothing_measured_the_lowest_id_after_give_up_after() -> None:
    assert home.pick_home({}, {4, 2}, elapsed=home.DECIDE_AFTER) is None
    assert home.pick_home({}, {4, 2}, elapsed=home.GIVE_UP_AFTER) == 2
    assert home.pick_home({}, set(), elapsed=home.GIVE_UP_AFTER) is None


def test_measurements_of_regions_that_left_do_not_count() -> None:
    assert home.pick_home({9: 0.001, 1: 0.02}, {1}, elapsed=0.0) == 1


def test_wanted_regions() -> None:
    assert home.wanted(None, {1, 2, 3}, []) == {1, 2, 3}  # choosing: measure them all
    assert home.wanted(1, {1, 2, 3}, [None, 3, 7]) == {1, 3}  # home and known peers' homes


def test_route_prefers_the_peers_region_when_its_link_is_open() -> None:
    def is_open(rid: int) -> bool:
        return rid == 2

    assert home.route(2, 1, {1, 2, 3}, is_open) == 2
    assert home.route(3, 1, {1, 2, 3}, is_open) == 1  # their region is down: through ours
    assert home.route(1, 1, {1, 2, 3}, is_open) == 1  # our home, even while it connects
    assert home.route(None, 1, {1, 2}, is_open) == 1
    assert home.route(7, None, {1, 2}, is_open) is None  # nowhere to send: drop


def test_fail_over_after_home_failover_seconds_when_there_is_another_region() -> None:
    assert not home.fail_over_due(None, 100.0, 2)
    assert not home.fail_over_due(99.0, 100.0, 2)
    assert home.fail_over_due(100.0 - home.HOME_FAILOVER, 100.0, 2)
    assert not home.fail_over_due(0.0, 100.0, 1)
