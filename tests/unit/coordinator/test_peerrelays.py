"""The coordinator's choice of a peer relay (coordinator/peerrelays.py, issue 14): closer than the region
relay by the nodes' own measurements, only where the policy lets the pair talk and both use the relay."""

from __future__ import annotations

from coordinator.pathreports import Facts, PeerPath, Report
from coordinator.peerrelays import CLOSER, Inputs, Planner, Server, choose, inputs_of, relayed_pairs

R, S = 7, 8
SERVERS = {R: Server(R, "203.0.113.7", range(41800, 41810)), S: Server(S, "203.0.113.8", range(41800, 41900))}
KEYS = {i: bytes([i]) * 32 for i in (1, 2, 3, 4, R, S)}


def _inp(
    direct: dict[tuple[int, int], float], region: float = 80.0, deny: set[frozenset[int]] | None = None
) -> Inputs:
    denied = deny or set()
    return Inputs(direct, {i: region for i in KEYS}, lambda a, b: frozenset((a, b)) not in denied)


def test_a_relay_both_sides_reach_faster_than_the_region_is_chosen() -> None:
    inp = _inp({(1, R): 5.0, (2, R): 5.0})
    assert choose(1, 2, SERVERS.values(), inp) == R


def test_not_closer_enough_no_relay_but_a_current_one_stays_until_it_is_slower() -> None:
    # region: 80 + 80 = 160 ms. Via R: 140 ms is not below 0.8 * 160 = 128 for a new plan...
    inp = _inp({(1, R): 70.0, (2, R): 70.0})
    assert CLOSER * 160 < 140
    assert choose(1, 2, SERVERS.values(), inp) is None
    # ...but a pair already on R keeps it while it is faster than the region at all
    assert choose(1, 2, SERVERS.values(), inp, current=R) == R
    assert choose(1, 2, SERVERS.values(), _inp({(1, R): 81.0, (2, R): 81.0}), current=R) is None


def test_the_nearest_of_two_relays_wins() -> None:
    inp = _inp({(1, R): 10.0, (2, R): 10.0, (1, S): 3.0, (2, S): 4.0})
    assert choose(1, 2, SERVERS.values(), inp) == S


def test_no_measurement_no_relay() -> None:
    assert choose(1, 2, SERVERS.values(), _inp({(1, R): 5.0})) is None  # beta never reached R directly
    no_region = Inputs({(1, R): 5.0, (2, R): 5.0}, {1: 80.0}, lambda a, b: True)
    assert choose(1, 2, SERVERS.values(), no_region) is None


def test_the_policy_decides_the_pair_and_each_sides_use_of_the_relay() -> None:
    direct = {(1, R): 5.0, (2, R): 5.0}
    assert choose(1, 2, SERVERS.values(), _inp(direct, deny={frozenset((1, 2))})) is None
    assert choose(1, 2, SERVERS.values(), _inp(direct, deny={frozenset((2, R))})) is None
    assert choose(1, 2, SERVERS.values(), _inp(direct, deny={frozenset((1, R))})) is None


def test_a_node_is_never_its_own_pairs_relay() -> None:
    assert choose(1, R, SERVERS.values(), _inp({(1, R): 1.0, (R, R): 0.0})) is None


def test_reports_become_pairs_and_inputs() -> None:
    reports = {
        1: Report(
            0.0,
            (PeerPath(2, "relay", "tcp", None), PeerPath(R, "direct", None, 3.5)),
            Facts(True, "EDM", None, 79.0),
        ),
        2: Report(0.0, (PeerPath(1, "relay", "tcp", None), PeerPath(R, "direct", None, 4.0)), None),
        3: Report(0.0, (PeerPath(4, "direct", None, 1.0),), None),
    }
    assert relayed_pairs(reports) == {(1, 2)}
    inp = inputs_of(reports, lambda a, b: True)
    assert inp.direct_ms == {(1, R): 3.5, (2, R): 4.0, (3, 4): 1.0}
    assert inp.region_ms == {1: 79.0}


def test_the_planner_assigns_distinct_ports_keeps_plans_and_withdraws_them() -> None:
    planner = Planner(random=lambda n: b"\x01" * n)
    inp = _inp({(i, R): 2.0 for i in (1, 2, 3, 4)})
    servers = {R: SERVERS[R]}
    made, gone = planner.step([(1, 2), (3, 4)], servers, inp, KEYS)
    assert len(made) == 2 and not gone
    ports = [p for _, plan in made for p in (plan.a.port, plan.b.port)]
    assert len(set(ports)) == 4 and all(p in SERVERS[R].ports for p in ports)
    assert made[0][1].a.key == KEYS[1] and made[0][1].b.node_id == 2
    # the same situation again: nothing new, nothing withdrawn (secrets and ports stay)
    assert planner.step([(1, 2), (3, 4)], servers, inp, KEYS) == ([], [])
    # the pair (3, 4) went direct, and then the relay went away
    made, gone = planner.step([(1, 2)], servers, inp, KEYS)
    assert not made and [pair for pair, _ in gone] == [(3, 4)]
    made, gone = planner.step([(1, 2)], {}, inp, KEYS)
    assert not made and [pair for pair, _ in gone] == [(1, 2)] and planner.plans == {}


def test_a_relay_serves_at_most_its_share_and_never_runs_out_of_ports() -> None:
    planner = Planner()
    small = {R: SERVERS[R]}  # 10 ports: 5 pairs
    inp = Inputs({(i, R): 2.0 for i in range(1, 40)}, dict.fromkeys(range(1, 40), 80.0), lambda a, b: True)
    keys = {i: bytes([i]) * 32 for i in range(1, 40)}
    pairs = [(i, i + 1) for i in range(1, 39, 2)]
    made, _ = planner.step(pairs, small, inp, keys)
    assert len(made) == 5  # the range's worth; the other pairs stay on the region relay
