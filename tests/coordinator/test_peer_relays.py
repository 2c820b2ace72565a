"""Peer relays at the coordinator (issue 14): `nodes relay NAME on|off` is audited; with path reports that
show a peer relay much closer than the region relay, the planner sends the relay a signed `serve` and
each side a signed `use` over their streams; when the policy bars one side from the relay the plan is
withdrawn (`stop`, `drop`)."""

from __future__ import annotations

import time
from typing import Any

from nacl.signing import SigningKey

from coordinator import nodes
from coordinator.peerrelays import Planner, step
from meshd import pathreport
from meshd.pathreport import Facts, PathEntry
from meshd.proto import netmap, peerrelay
from tests.coordinator.conftest import Coord

BARRED = (  # a and b may talk, a may talk to the relay, b may not
    '[[rules]]\nsrc = ["node:a", "node:b"]\ndst = ["node:a:*", "node:b:*"]\n'
    '[[rules]]\nsrc = ["node:a"]\ndst = ["node:hop:*"]\n'
)


async def test_turning_a_peer_relay_on_and_off_is_audited(coord: Coord) -> None:
    await coord.enroll("hop")
    r = await coord.admin.post("/admin/nodes/hop/relay", json={"on": True})
    assert r.status_code == 200 and r.json() == {"on": True}
    assert (await coord.admin.post("/admin/nodes/hop/relay", json={"on": False})).json() == {"on": False}
    events = [e for e in (await coord.admin.get("/admin/audit")).json() if e["action"] == "node.peer_relay"]
    assert [e["details"]["on"] for e in events] == [True, False]
    assert (await coord.admin.post("/admin/nodes/nobody/relay", json={"on": True})).status_code == 404
    assert (await coord.admin.post("/admin/nodes/hop/relay", json={"on": "maybe"})).status_code == 422


async def test_the_planner_offers_a_close_peer_relay_and_withdraws_it_when_the_policy_bars_it(
    coord: Coord,
) -> None:
    key = await coord.user_and_key(reusable=True)
    (a, ea), (b, eb), (h, eh) = [await coord.enroll(n, key) for n in ("a", "b", "hop")]
    await coord.admin.post("/admin/nodes/hop/relay", json={"on": True})
    core = coord.core
    await nodes.set_endpoints(core, eh.node_id, None, True)  # online, as with an open stream
    for me, peer in ((a, eb), (b, ea)):
        summary = (PathEntry(peer.node_id, "relay", "tcp", None), PathEntry(eh.node_id, "direct", None, 2.0))
        assert await pathreport.send(me, summary, Facts(True, "EDM", None, relay_ms=90.0)) == 2
    assert await pathreport.send(h, (), Facts(True, "EIM", None, serve=("203.0.113.7", 41800, 41899))) == 0

    sent: list[tuple[int, dict[str, Any]]] = []

    def capture(node_id: int, message: str) -> bool:
        msg = netmap.decode_server_message(message)
        assert isinstance(msg, netmap.SignalMessage) and msg.peer == 0
        sent.append((node_id, msg.payload))
        return True

    core.hub.send_to = capture  # type: ignore[method-assign]
    seed = core.state.signing_seed() if core.state.signing_seed else None
    assert seed is not None
    trusted = [bytes(SigningKey(seed).verify_key)]
    planner = Planner()
    await step(core, planner)
    got = {n: peerrelay.decode(p, n, trusted, time.time()) for n, p in sent}
    serve, use_a, use_b = got[eh.node_id], got[ea.node_id], got[eb.node_id]
    assert isinstance(serve, peerrelay.Serve) and {serve.a.node_id, serve.b.node_id} == {
        ea.node_id,
        eb.node_id,
    }
    assert isinstance(use_a, peerrelay.Use) and isinstance(use_b, peerrelay.Use)
    assert use_a.addr == "203.0.113.7" and use_a.name == "hop" and use_a.relay == eh.node_id
    assert use_a.peer == b.keys.wg_public and use_b.peer == a.keys.wg_public
    assert {use_a.port, use_b.port} == {serve.a.port, serve.b.port} and use_a.port != use_b.port
    # each side gets its own secret only
    side_a = serve.a if serve.a.node_id == ea.node_id else serve.b
    assert use_a.secret == side_a.secret and use_b.secret != use_a.secret
    # the same situation: nothing new is sent before the refresh
    sent.clear()
    await step(core, planner)
    assert sent == []
    # the policy lets a and b talk but only a use the relay: the plan is withdrawn
    assert (await coord.admin.put("/admin/policy", json={"policy": BARRED})).status_code == 200
    await step(core, planner)
    kinds = {n: type(peerrelay.decode(p, n, trusted, time.time())).__name__ for n, p in sent}
    assert kinds == {eh.node_id: "Stop", ea.node_id: "Drop", eb.node_id: "Drop"}
    assert planner.plans == {}
    for c in (a, b, h):
        await c.aclose()
