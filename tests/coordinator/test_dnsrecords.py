"""Admin-defined DNS records through the admin API (issue 17): validated, audited, delivered to every
node in its map (full map and delta), refused for a node's name."""

from __future__ import annotations

from sqlalchemy import select

from coordinator.db.models import AuditRecord
from meshd.proto import netmap
from tests.coordinator.conftest import Coord


async def test_set_list_remove_audited_and_in_every_map(coord: Coord) -> None:
    _, a = await coord.enroll("a")
    state = coord.core.state
    before = state.version
    r = await coord.admin.put("/admin/dns/Printer", json={"ip": "10.1.0.5"})
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "printer"
    r = await coord.admin.put("/admin/dns/db.prod", json={"ip": "fd00:0::7"})
    assert r.json()["ip"] == "fd00::7"
    listed = (await coord.admin.get("/admin/dns")).json()
    assert [(x["name"], x["ip"]) for x in listed] == [("db.prod", "fd00::7"), ("printer", "10.1.0.5")]

    msg = netmap.decode_server_message(state.full_map_message(a.node_id))
    assert isinstance(msg, netmap.MapMessage)
    assert msg.map.dns_records == (("db.prod", "fd00::7"), ("printer", "10.1.0.5"))
    assert msg.map == state.full_map(a.node_id)  # the assembled bytes are the canonical encoding
    pending = state.pending_since(before)
    assert pending is not None and pending.dns
    assert state.delta_for(pending, a.node_id).dns_records == msg.map.dns_records

    assert (await coord.admin.delete("/admin/dns/printer")).status_code == 204
    assert state.dns_records == (("db.prod", "fd00::7"),)
    assert (await coord.admin.delete("/admin/dns/printer")).status_code == 404
    async with coord.core.read() as s:
        actions = (
            await s.execute(
                select(AuditRecord.action, AuditRecord.object).where(AuditRecord.action.like("dns.%"))
            )
        ).all()
    assert [tuple(x) for x in actions] == [
        ("dns.set", "dns:printer"),
        ("dns.set", "dns:db.prod"),
        ("dns.removed", "dns:printer"),
    ]


async def test_bad_names_addresses_and_node_names_are_refused(coord: Coord) -> None:
    await coord.enroll("laptop")
    for name, ip in [("bad_name", "10.0.0.1"), ("a..b", "10.0.0.1"), ("x" * 64, "10.0.0.1"), ("ok", "nope")]:
        r = await coord.admin.put(f"/admin/dns/{name}", json={"ip": ip})
        assert r.status_code == 400, (name, ip, r.text)
    r = await coord.admin.put("/admin/dns/laptop", json={"ip": "10.0.0.1"})
    assert r.status_code == 409 and "node" in r.text
    assert (await coord.admin.get("/admin/dns")).json() == []
