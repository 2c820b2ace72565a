"""Hostile: an enrolled node reads everything its coordinator sends it (issue 12, "Least knowledge").

Maps used to carry the whole policy text: every user, group, host alias, rule and test. Mallory, with one
enrolled machine, could read who may reach what across the mesh. Now a node's map holds only its own
record, the peers it may talk to (their names, addresses, keys, tags: what it needs to reach them) and
its own inbound rules (CIDRs and ports). The test reads the exact bytes mallory's node receives (full map
on the stream, the deltas after a policy change, the long-poll map) and looks for every name the policy
holds that does not concern her.

Names are long enough (six letters or more, or with ``:``) that they cannot turn up by chance inside the
base64 of keys, certificates and signatures.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from meshd.control import ControlClient, Enrollment, NodeKeys
from meshd.proto import netmap, signing
from tests.coordinator import conftest as coordinator_fixtures
from tests.coordinator.conftest import Coord
from tests.eventually import eventually_async

pytestmark = pytest.mark.hostile

settings, core, coord, live = (
    coordinator_fixtures.settings,
    coordinator_fixtures.core,
    coordinator_fixtures.coord,
    coordinator_fixtures.live,
)


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'coordinator.db'}"


USERS = {"alicia": "laptop1", "bobbie": "server2", "caroline": "desktop3", "mallory": "pcfour"}

POLICY = """\
[groups]
admingroup = ["alicia", "caroline"]
engineers = ["bobbie"]

[hosts]
backupvault = "100.64.250.9"
secretdbnet = "100.64.251.0/24"

[[rules]]
src = ["group:admingroup"]
dst = ["user:bobbie:22", "backupvault:22"]
proto = "tcp"

[[rules]]
src = ["group:engineers"]
dst = ["secretdbnet:5432"]
proto = "tcp"

[[rules]]
src = ["user:mallory"]
dst = ["user:bobbie:80"]
proto = "tcp"

[[tests]]
src = "user:alicia"
accept = ["user:bobbie:22"]
deny = ["user:caroline:22"]
"""

CHANGED = (
    POLICY.replace('engineers = ["bobbie"]', 'engineers = ["bobbie"]\nauditteam = ["caroline"]')
    + """
[[rules]]
src = ["group:auditteam"]
dst = ["user:alicia:443"]
proto = "tcp"
"""
)

#: what mallory has no business knowing: other users, groups, aliases, their addresses, rule/test text
SECRETS = (
    "alicia",
    "bobbie",
    "caroline",
    "admingroup",
    "engineers",
    "auditteam",
    "backupvault",
    "secretdbnet",
    "100.64.250.9",
    "100.64.251.",
    "user:",
    "group:",
    "[[rules]]",
    "[[tests]]",
    "accept",
    "laptop1",  # alicia's node: the policy does not let mallory talk to it
    "desktop3",
)


async def enroll(c: Coord, user: str) -> tuple[NodeKeys, Enrollment]:
    client = ControlClient(c.url, NodeKeys.generate())
    result = await client.register(USERS[user], auth_key=await c.user_and_key(user))
    await client.aclose()
    assert isinstance(result, Enrollment)
    return client.keys, result


def as_text(frame: str | bytes) -> bytes:
    """A stream message as its UTF-8 text: a long one comes compressed in a binary frame, and a search
    for secrets in compressed bytes would find nothing whatever they held."""
    return (netmap.inflate_frame(frame) if isinstance(frame, bytes) else frame).encode()


async def long_poll_bytes(c: Coord, keys: NodeKeys, node_id: int) -> bytes:
    path = f"/api/v1/map?proto={netmap.MAP_FORMAT}"
    headers = signing.sign_request(keys.node_private, str(node_id), "GET", path, b"", time.time())
    r = await c.api.get(path, headers=headers)
    assert r.status_code == 200, r.text
    return r.content


async def test_a_nodes_map_holds_only_what_concerns_it(live: Coord) -> None:
    enrolled = {u: await enroll(live, u) for u in USERS}
    assert (await live.admin.put("/admin/policy", json={"policy": POLICY})).status_code == 200
    m_keys, mallory = enrolled["mallory"]
    received: list[bytes] = [await long_poll_bytes(live, m_keys, mallory.node_id)]

    client = ControlClient(live.url, m_keys, mallory.node_id)
    async with client.stream() as stream:
        full = as_text(await stream.ws.recv())
        received.append(full)
        first = netmap.decode_server_message(full)
        assert isinstance(first, netmap.MapMessage)
        # positive control: mallory gets what she needs, the node of the user she may reach
        assert [p.name for p in first.map.peers] == [USERS["bobbie"]]

        assert (await live.admin.put("/admin/policy", json={"policy": CHANGED})).status_code == 200
        version = live.core.state.version
        deltas: list[netmap.Delta] = []

        async def caught_up() -> bool:
            raw = as_text(await stream.ws.recv())
            received.append(raw)
            msg = netmap.decode_server_message(raw)
            if isinstance(msg, netmap.DeltaMessage):
                deltas.append(msg.delta)
            return bool(deltas) and deltas[-1].version >= version

        await eventually_async(caught_up, within=5, what="the policy change reached mallory")
    await client.aclose()
    received.append(await long_poll_bytes(live, m_keys, mallory.node_id))

    assert any(d.inbound is not None for d in deltas), "the policy change must have reached mallory"
    everything = b"\n".join(received).decode()
    policies = POLICY + CHANGED
    for secret in SECRETS:
        assert secret in policies or secret in USERS.values()  # the attack would find it in the old maps
        assert secret not in everything, f"mallory's node received {secret!r}"
    assert '"policy"' not in everything
    assert USERS["bobbie"] in everything  # the peer she may reach is legitimately named
