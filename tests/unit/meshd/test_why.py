"""The "why relayed?" verdict for every combination of both sides' netcheck facts."""

from __future__ import annotations

import itertools

import pytest

from meshd.why import Mapping, NetFacts, verdict

UDP = [True, False, None]
MAPPINGS = [Mapping.NONE, Mapping.EIM, Mapping.EDM, None]
PORTMAPS = [None, "upnp"]
SIDES = [
    (udp, mapping, portmap)
    for udp, mapping, portmap in itertools.product(UDP, MAPPINGS, PORTMAPS)
    if not (mapping is Mapping.NONE and portmap)  # a public address has no router to map on
]


def _reason(v: str) -> str:
    reasons = ["UDP blocked", "no passable port pair", "no netcheck facts", "a direct path should exist"]
    return next(r for r in reasons if r in v)


def facts(name: str, side: tuple[bool | None, Mapping | None, str | None]) -> NetFacts:
    return NetFacts(name, side[0], side[1], side[2])


def test_the_issue_examples() -> None:
    a = NetFacts("a", True, Mapping.EIM)
    b = NetFacts("b", True, Mapping.EDM)
    assert verdict(a, b, direct=False) == (
        "a: EIM, b: EDM without port mapping: no passable port pair; enable UPnP or NAT-PMP on b's router"
    )
    blocked = NetFacts("a", False, None)
    assert verdict(blocked, b, direct=False) == (
        "UDP blocked on a's network: TCP relay; allow outbound UDP there for a direct path"
    )


@pytest.mark.parametrize(("sa", "sb"), list(itertools.product(SIDES, SIDES)))
def test_every_combination(
    sa: tuple[bool | None, Mapping | None, str | None], sb: tuple[bool | None, Mapping | None, str | None]
) -> None:
    a, b = facts("alpha", sa), facts("beta", sb)
    assert verdict(a, b, direct=True) is None, "a direct path needs no explanation"
    v = verdict(a, b, direct=False)
    assert v is not None and "\n" not in v and len(v) < 200
    mirrored = verdict(b, a, direct=False)
    assert mirrored is not None
    # the same reason whichever side asks (the sentence names the sides in the asker's order)
    assert _reason(v) == _reason(mirrored)
    if a.udp is False or b.udp is False:
        assert v.startswith("UDP blocked") and "TCP relay" in v
        for f in (a, b):
            assert (f"{f.name}'s" in v) == (f.udp is False)
        return
    edm_unmapped = [f for f in (a, b) if f.mapping is Mapping.EDM and not f.portmap]
    eim_unmapped = [f for f in (a, b) if f.mapping is Mapping.EIM and not f.portmap]
    if len(edm_unmapped) == 2:
        assert "no passable port pair" in v and "alpha's or beta's router" in v
    elif edm_unmapped and eim_unmapped:
        assert "no passable port pair" in v
        assert v.endswith(f"enable UPnP or NAT-PMP on {edm_unmapped[0].name}'s router")
        assert f"{edm_unmapped[0].name}: EDM without port mapping" in v
    elif any(f.udp is None or f.mapping is None for f in (a, b)):
        assert v.startswith("no netcheck facts from")
        for f in (a, b):
            assert (f.name in v) == (f.udp is None or f.mapping is None)
    else:
        assert "a direct path should exist" in v, "port-mapped or public on one side: passable"
