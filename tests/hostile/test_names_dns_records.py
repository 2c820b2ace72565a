"""Hostile: a node cannot take over an admin DNS record's name (issue 12, "names of the mesh domain's own
records"; the records came with issue 17).

``coordinator dns set printer 10.1.2.3`` makes ``printer.<domain>`` the printer on every node. Nodes
choose their own names at enrollment, so mallory's machine enrolled with ``--hostname printer`` must not
become ``printer``: it gets a suffix (``printer-1``), like a user's or a reserved name, and an admin
rename onto the record's name is refused. Should a map carry both anyway (a database written by an older
version, a coordinator that does not check), meshd's resolver answers the record and the hosts block
leaves the node out: the printer's name keeps pointing at the printer.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any

import dns.message
import dns.rdatatype
import dns.reversename
import pytest

from meshd.dns import zone as dnszone
from meshd.proto import netmap
from tests.coordinator.conftest import Coord, coord, core, db_url, pg_socket, settings  # noqa: F401 - fixtures
from tests.unit.meshd.test_mapapply import a_map, peer, setup  # noqa: F401 - fixture

pytestmark = pytest.mark.hostile

PRINTER = "10.1.2.3"


def resolve(z: dnszone.Zone, name: str) -> list[str]:
    """What meshd's resolver answers for an A query of `name` (sans-IO: the same function serves port 53)."""
    wire = dnszone.answer(dns.message.make_query(name, dns.rdatatype.A).to_wire(), z)
    assert wire is not None
    return sorted(rd.to_text() for rrset in dns.message.from_wire(wire).answer for rd in rrset)


def zone_of(m: netmap.NetMap) -> dnszone.Zone:
    """The zone meshd builds from a map: this node, its peers and the map's records (meshd.dns.service)."""
    nodes = [(m.self_node.name, m.self_node.ips)] + [(p.name, p.ips) for p in m.peers]
    return dnszone.build(m.domain or "mesh", nodes, m.dns_records)


async def test_a_node_enrolled_under_a_records_name_gets_a_suffix_and_every_map_keeps_the_record(
    coord: Coord,  # noqa: F811
) -> None:
    r = await coord.admin.put("/admin/dns/printer", json={"ip": PRINTER})
    assert r.status_code == 200, r.text
    _, alice = await coord.enroll("alice-laptop")
    _, bob = await coord.enroll("bob-desktop")
    _, mallory = await coord.enroll("printer")  # what `meshd up --hostname printer` sends
    assert mallory.name == "printer-1"
    _, control = await coord.enroll("scanner")  # positive control: a free name is taken as asked
    assert control.name == "scanner"

    for node in (alice, bob, mallory, control):
        msg = netmap.decode_server_message(coord.core.state.full_map_message(node.node_id))
        assert isinstance(msg, netmap.MapMessage)
        m = msg.map
        assert "printer" not in [m.self_node.name, *(p.name for p in m.peers)]
        assert ("printer", PRINTER) in m.dns_records
        assert resolve(zone_of(m), "printer.mesh.") == [PRINTER], node.name
        mallory_ip = str(ipaddress.ip_interface(mallory.ips[0]).ip)
        assert resolve(zone_of(m), "printer-1.mesh.") == [mallory_ip]  # mallory keeps her own name

    # the admin cannot rename a node onto the record either (one line, 409), nor set a record on a node
    r = await coord.admin.post("/admin/nodes/printer-1/rename", json={"new_name": "printer"})
    assert r.status_code == 409, r.text
    assert "DNS record" in r.json()["detail"] and "\n" not in r.json()["detail"]
    r = await coord.admin.put("/admin/dns/scanner", json={"ip": "10.1.2.4"})
    assert r.status_code == 409 and "node" in r.text
    names = [n["name"] for n in (await coord.admin.get("/admin/nodes")).json()]
    assert "printer" not in names and "printer-1" in names
    assert coord.core.state.dns_records == (("printer", PRINTER),)


def test_if_a_map_carries_a_node_and_a_record_of_one_name_the_resolver_answers_the_record() -> None:
    m = dataclasses.replace(a_map(1, peer(2, "printer"), peer(3, "b")), dns_records=(("printer", PRINTER),))
    z = zone_of(m)
    assert resolve(z, "printer.mesh.") == [PRINTER]
    assert resolve(z, "b.mesh.") == ["100.64.0.3"]  # control: other peers answer as before
    # the node that lost the name is not its address's PTR name either (that would point at the printer)
    ptr = dns.message.make_query(dns.reversename.from_address("100.64.0.2"), dns.rdatatype.PTR).to_wire()
    wire = dnszone.answer(ptr, z)
    assert wire is not None and not dns.message.from_wire(wire).answer
    # this node's own name loses too: a record is the admin's word
    me = dataclasses.replace(a_map(1, peer(3, "b")), dns_records=(("a", PRINTER),))
    assert resolve(zone_of(me), "a.mesh.") == [PRINTER]


async def test_if_a_map_carries_a_node_and_a_record_of_one_name_the_hosts_block_leaves_the_node_out(
    setup: Any,  # noqa: F811
) -> None:
    applier, _, _, hosts_path = setup
    m = dataclasses.replace(a_map(1, peer(2, "printer"), peer(3, "b")), dns_records=(("printer", PRINTER),))
    await applier.apply(m)
    text = hosts_path.read_text()
    assert "printer" not in text  # neither printer.mesh nor printer points at the node
    assert "100.64.0.3 b.mesh b" in text  # control
    assert [v.name for v in applier.verified] == ["printer", "b"]  # still a peer, reachable by address
