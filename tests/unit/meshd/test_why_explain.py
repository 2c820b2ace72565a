"""Why relayed, on the node (issue 15): this node's facts (a public address is "none", not EIM), the
peer's facts from the map, the ``why`` of ``status --json`` and the lines of ``meshd ping --explain``."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from meshd import why
from meshd.api import ControlServer
from meshd.cli import app, explanation
from meshd.nat.strategy import NatInfo
from meshd.pathreport import Facts, facts_of
from meshd.why import Mapping, NetFacts

STUN_A, STUN_B = ("7.0.0.1", 3478), ("7.0.0.2", 3478)
EDM_SENTENCE = (
    "a: EDM, b: EDM, neither with port mapping: no passable port pair; enable UPnP or NAT-PMP on a's or "
    "b's router"
)


def test_a_stun_answer_naming_one_of_our_own_addresses_is_a_public_address_not_eim() -> None:
    seen = NatInfo(reflexive={STUN_A: ("7.0.0.9", 41641), STUN_B: ("7.0.0.9", 41641)})
    assert facts_of(seen) == Facts(True, "EIM")  # without our addresses: looks like an EIM NAT
    assert facts_of(seen, {"10.0.0.2", "7.0.0.9"}) == Facts(True, "none")
    one = NatInfo(reflexive={STUN_A: ("7.0.0.9", 41641)})
    assert facts_of(one, {"7.0.0.9"}) == Facts(True, "none")  # one answer is enough to tell
    behind = NatInfo(reflexive={STUN_A: ("203.0.113.5", 1000), STUN_B: ("203.0.113.5", 1001)})
    assert facts_of(behind, {"10.0.0.2"}) == Facts(True, "EDM")


def test_the_wire_form_reads_into_the_verdicts_facts() -> None:
    assert why.side("b", True, "none", None) == NetFacts("b", True, Mapping.NONE)
    assert why.side("b", None, "EDM", "upnp") == NetFacts("b", None, Mapping.EDM, "upnp")
    assert why.side("b", True, "symmetric", None) == NetFacts("b", True, None)  # unknown: not known


def test_status_why_is_a_sentence_while_relayed_and_null_otherwise() -> None:
    a, b = why.side("a", True, "EDM", None), why.side("b", True, "EDM", None)
    assert why.for_path("relay", a, b) == EDM_SENTENCE
    assert why.for_path("direct", a, b) is None
    assert why.for_path("none", a, b) is None
    public = why.side("b", True, "none", None)
    assert why.for_path("relay", a, public) == (
        "a: EDM, b: public address: a direct path should exist but probes are not answered; a firewall "
        "between them may drop UDP (or the attempt is still running)"
    )
    assert why.for_path("relay", NetFacts("a", None, None), b) == (
        "no netcheck facts from a yet: cannot tell; relayed until probes are answered"
    )


def test_each_sides_facts_in_words() -> None:
    assert why.summary(why.side("a", True, "EDM", None)) == "UDP yes, NAT EDM, port mapping none"
    assert why.summary(why.side("a", True, "EIM", "natpmp")) == "UDP yes, NAT EIM, port mapping natpmp"
    assert why.summary(why.side("a", True, "none", None)) == "UDP yes, public address (no NAT)"
    assert why.summary(NetFacts("a", False, None)) == "UDP blocked, NAT unknown, port mapping none"


FACTS = {"self": "UDP yes, NAT EDM, port mapping none", "peer": "UDP yes, NAT EDM, port mapping none"}
RELAYED = {
    "peer": "b", "ip": "100.64.0.2", "answered": True, "rtt_ms": 3.2, "path": "relay", "endpoint": None,
    "why": EDM_SENTENCE, "facts": FACTS,
}  # fmt: skip


def test_the_explanation_lines() -> None:
    assert explanation(RELAYED) == (
        f"why relayed: {EDM_SENTENCE}\n  this node: {FACTS['self']}\n  b: {FACTS['peer']}"
    )
    direct = {**RELAYED, "path": "direct", "why": None}
    assert explanation(direct).startswith("direct: nothing to explain\n")
    assert explanation({**RELAYED, "path": "none", "why": None}).startswith("no path yet")
    # an older meshd answers without why/facts: still one honest line
    assert explanation({"peer": "b", "path": "relay"}) == "why relayed: unknown"


@pytest.fixture
def daemon_answering() -> Iterator[tuple[Path, list[dict[str, Any]]]]:
    """A real control socket (meshd.api) answering `ping` with the next queued document."""
    d = Path(tempfile.mkdtemp(prefix="meshd-why-"))
    answers: list[dict[str, Any]] = []

    async def ping(args: dict[str, Any]) -> Any:
        return answers.pop(0)

    loop = asyncio.new_event_loop()
    server = ControlServer(d / "meshd.sock", {"ping": ping, "status": ping})
    loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield d, answers
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.run_until_complete(server.close())
        loop.close()
        shutil.rmtree(d, ignore_errors=True)


def test_meshd_ping_explain_prints_the_verdict_and_both_sides(
    daemon_answering: tuple[Path, list[dict[str, Any]]],
) -> None:
    state_dir, answers = daemon_answering
    answers.extend([RELAYED, RELAYED, {**RELAYED, "answered": False}])
    r = CliRunner().invoke(app, ["ping", "b", "--explain", "--state-dir", str(state_dir)])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines() == [
        "pong from b (100.64.0.2) via relay in 3.20 ms",
        f"why relayed: {EDM_SENTENCE}",
        f"  this node: {FACTS['self']}",
        f"  b: {FACTS['peer']}",
    ]
    plain = CliRunner().invoke(app, ["ping", "b", "--state-dir", str(state_dir)])
    assert plain.output == "pong from b (100.64.0.2) via relay in 3.20 ms\n"  # no --explain: as before
    unanswered = CliRunner().invoke(app, ["ping", "b", "--explain", "--state-dir", str(state_dir)])
    assert unanswered.exit_code == 1
    assert f"why relayed: {EDM_SENTENCE}" in unanswered.output and "no answer from b" in unanswered.output


BLOCKED = "UDP blocked on a's network: TCP relay; allow outbound UDP there for a direct path"


def test_the_status_table_says_why_under_the_peers(
    daemon_answering: tuple[Path, list[dict[str, Any]]],
) -> None:
    state_dir, answers = daemon_answering
    peer = {
        "name": "b", "ips": ["100.64.0.2/32"], "public_key": "QkJC", "path": "relay", "endpoint": None,
        "relay": "default", "latency_ms": None, "last_handshake": None, "rx_bytes": 0, "tx_bytes": 0,
        "relay_transport": "tcp", "routes": [], "why": BLOCKED,
    }  # fmt: skip
    doc = {
        "self": {"name": "a", "ips": ["100.64.0.1/32"], "public_key": "QUFB", "interface": "mesh0",
                 "backend": "userspace", "endpoints": [],
                 "nat": {"mapping_varies_by_dest": None, "portmap": None},
                 "relay": "default", "firewall_error": None, "dns": None},
        "coordinator": {"url": "http://c", "connected": True},
        "peers": [peer],
    }  # fmt: skip
    answers.extend([doc, doc])
    r = CliRunner().invoke(app, ["status", "--state-dir", str(state_dir)], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert f"b relayed: {peer['why']}" in r.output
    r = CliRunner().invoke(app, ["status", "--json", "--state-dir", str(state_dir)])
    assert r.exit_code == 0 and '"why": "UDP blocked on a' in r.output
