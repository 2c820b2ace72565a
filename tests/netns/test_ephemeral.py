"""Ephemeral nodes end to end (issue 17): real meshd daemons enrolled with an --ephemeral key are removed
at once on `meshd down`, and after the timeout when they vanish without a word; a plain node stays."""

from __future__ import annotations

import json
import signal

import pytest

from tests.eventually import eventually
from tests.netns.lab import Lab
from tests.netns.mesh import Mesh

pytestmark = pytest.mark.netns


def names(mesh: Mesh) -> set[str]:
    return {n["name"] for n in json.loads(mesh.admin("nodes", "list", "--json").stdout)}


def test_ephemeral_nodes_leave_on_down_and_after_the_timeout(lab: Lab, mesh: Mesh) -> None:
    mesh.start_coordinator(lab.server(), extra=("--ephemeral-timeout", "3s"))
    key = mesh.new_key("ci", "--reusable", "--ephemeral")
    plain = mesh.up(lab.host(nat="public"), "plain")
    runner = mesh.up(lab.host(nat="public"), "runner", key=key)
    crashed = mesh.up(lab.host(nat="public"), "crashed", key=key)
    mesh.wait_peer(plain, "runner")
    mesh.wait_peer(plain, "crashed")

    mesh.meshd(runner, "down")
    assert "runner" not in names(mesh)  # gone by the time `meshd down` returned
    mesh.wait_peer(plain, "runner", present=False, within=5)
    assert runner.proc is not None and runner.proc.wait(10) == 0, runner.log_tail()  # a stop, not a failure

    assert crashed.proc is not None
    crashed.proc.send_signal(signal.SIGKILL)  # no goodbye: the timeout does it
    crashed.proc.wait(10)
    eventually(lambda: "crashed" not in names(mesh), within=15, what="crashed ephemeral node removed")
    assert names(mesh) == {"plain"}  # the positive control: an ordinary node is never removed
    trail = json.loads(mesh.admin("audit", "list", "--json").stdout)
    removed = {r["object"]: r for r in trail if r["action"] == "node.removed"}
    assert removed["node:runner"]["actor"] == "node:runner"
    assert removed["node:crashed"]["actor"] == "coordinator"
