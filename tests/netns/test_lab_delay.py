"""Links with latency (a user-space delay wire: this kernel has no netem): RTT as configured, TCP works."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.eventually import eventually
from tests.netns.lab import Lab

pytestmark = pytest.mark.netns


def _rtt_min(out: str) -> float:
    m = re.search(r"= ([0-9.]+)/", out)
    assert m, out
    return float(m.group(1))


def test_delayed_links_add_their_latency_both_ways(lab: Lab) -> None:
    s = lab.server(delay_ms=20)
    a = lab.host(nat="eim", wan_delay_ms=10)
    b = lab.host(nat="public")
    ab = _rtt_min(a.run(["ping", "-n", "-c", "4", "-i", "0.2", s.ip], check=True).stdout)
    bb = _rtt_min(b.run(["ping", "-n", "-c", "4", "-i", "0.2", s.ip], check=True).stdout)
    assert 60 <= ab < 60 + 40, f"eim host -> delayed server: {ab} ms, want about 2 * (10 + 20)"
    assert 40 <= bb < 40 + 40, f"public host -> delayed server: {bb} ms, want about 2 * 20"


def test_tcp_crosses_a_delayed_link(lab: Lab) -> None:
    s = lab.server(delay_ms=5)
    a = lab.host(nat="eim", wan_delay_ms=5)
    s.popen(["iperf3", "-s", "-1"], stdout=subprocess.DEVNULL)
    eventually(
        lambda: s.run(["ss", "-Hltn", "sport = :5201"]).stdout.strip(), within=5, what="iperf3 listens"
    )
    r = a.run(["timeout", "10", "iperf3", "-c", s.ip, "-t", "1"], timeout=20)
    assert r.returncode == 0 and "receiver" in r.stdout, r.stdout + r.stderr
