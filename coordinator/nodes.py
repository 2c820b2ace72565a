"""Nodes: creation (shared by both enrollment paths), certificates, admin actions, endpoints, policy."""

from __future__ import annotations

import json
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import ColumnElement, Select, delete, func, or_, select, text

from coordinator import onlineflags
from coordinator import policy as access
from coordinator.certs import issue_node_cert
from coordinator.coalesce import Coalescer, HeldWrites
from coordinator.core import Core, Tx, peer_of
from coordinator.db.models import DnsRecord, Meta, Node, Quarantine, User
from coordinator.errors import BadRequest, Conflict, Forbidden, NotFound
from coordinator.identity import check_tags
from coordinator.ipam import IpamError, dns_label, is_dns_label, reserved_names, unique_name
from meshd.proto.encoding import b64decode


@dataclass(frozen=True, slots=True)
class NodeInfo:
    id: int
    name: str
    user: str | None
    ipv4: str
    ipv6: str
    wg_public_key: str
    node_public_key: str
    tags: tuple[str, ...]
    created_at: float
    expired: bool
    online: bool
    endpoints: tuple[str, ...]
    cert_not_after: int | None


@dataclass(frozen=True, slots=True)
class Enrolled:
    node_id: int
    name: str
    ips: tuple[str, ...]
    cert: str


async def _next_serial(tx: Tx) -> int:
    row = await tx.session.get(Meta, "cert_serial")
    if row is None:
        row = Meta(key="cert_serial", value="0")
        tx.session.add(row)
    serial = int(row.value) + 1
    row.value = str(serial)
    return serial


async def _issue(tx: Tx, node: Node, now: float) -> str:
    core = tx.core
    serial = await _next_serial(tx)
    cert, payload = issue_node_cert(
        core.keys,
        serial=serial,
        name=node.name,
        node_id=node.id,
        ips=(f"{node.ipv4}/32", f"{node.ipv6}/128"),
        wg_public_key=node.wg_public_key,
        node_public_key=node.node_public_key,
        tags=tuple(json.loads(node.tags)),
        now=now,
        lifetime=core.settings.cert_lifetime,
    )
    node.cert = cert
    await tx.audit(
        "coordinator",
        "cert.issued",
        f"node:{node.name}",
        {"serial": serial, "not_after": payload.not_after, "issuer": payload.issuer},
    )
    return cert


_HELD = "create_node.held"  #: session.info key: the quarantine and user names read once per transaction


async def _held_names(tx: Tx, now: float) -> tuple[list[tuple[str, str | None]], set[str]]:
    """The quarantined (name, ipv4) pairs, and every name a new node may not take as it is (quarantined,
    users', reserved, admin DNS records'), read once per transaction: enrollments that share one
    (coordinator/groupcommit.py) only add nodes, and nothing that writes quarantine, users or DNS records
    shares a transaction with create_node."""
    cached: tuple[list[tuple[str, str | None]], set[str]] | None = tx.session.info.get(_HELD)
    if cached is not None:
        return cached
    s = tx.session
    await s.execute(delete(Quarantine).where(Quarantine.until <= now))
    held = [(name, ipv4) for name, ipv4 in (await s.execute(select(Quarantine.name, Quarantine.ipv4))).all()]
    names = {name for name, _ in held}
    names |= {u.lower() for u in (await s.execute(select(User.name))).scalars().all()}
    names |= reserved_names(tx.core.settings.domain)
    names |= set((await s.execute(select(DnsRecord.name))).scalars().all())  # printer.<domain> is the printer
    tx.session.info[_HELD] = (held, names)
    return held, names


@dataclass
class _Made:
    """Names and keys of the nodes made in this transaction, not flushed yet."""

    names: set[str] = field(default_factory=set)
    keys: set[str] = field(default_factory=set)


_MADE = "create_node.made"  #: session.info key of the transaction's _Made
_NEXT_ID = "create_node.next_id"  #: session.info key: the id the next node made in this transaction gets


def _made_here(tx: Tx) -> _Made:
    made: _Made | None = tx.session.info.get(_MADE)
    if made is None:
        made = tx.session.info[_MADE] = _Made()
    return made


async def _next_node_id(tx: Tx) -> int:
    """Node ids are given here, not by the database at a flush (there is none per node): the highest id
    plus one, as SQLite's rowid does; on PostgreSQL the id sequence is moved past them before the commit
    (writers are serialised by the core's write lock, across replicas too)."""
    s = tx.session
    next_id: int | None = s.info.get(_NEXT_ID)
    if next_id is None:
        with s.no_autoflush:
            next_id = int((await s.execute(select(func.max(Node.id)))).scalar() or 0) + 1
        if tx.core.is_postgres:

            async def move_sequence() -> None:
                last = s.info[_NEXT_ID] - 1
                await s.execute(text("SELECT setval(pg_get_serial_sequence('nodes', 'id'), :v)"), {"v": last})

            tx.before_commit(move_sequence)
    s.info[_NEXT_ID] = next_id + 1
    return next_id


def _similar(base: str) -> ColumnElement[bool]:
    """Names `base` and `base-...` (a range, not LIKE: the name index serves it)."""
    return or_(Node.name == base, (Node.name > f"{base}-") & (Node.name < f"{base}."))


def _clash_query(bases: list[str], wgs: list[str], nks: list[str]) -> Select[str, str, str]:
    keys = or_(Node.wg_public_key.in_(wgs), Node.node_public_key.in_(nks))
    return select(Node.name, Node.wg_public_key, Node.node_public_key).where(
        or_(keys, *(_similar(b) for b in dict.fromkeys(bases)))
    )


_FOUND = "create_node.found"  #: session.info: (candidates, rows) of :func:`prefetch_clashes`


async def prefetch_clashes(tx: Tx, candidates: list[tuple[str, str, str]]) -> None:
    """One query for the key clashes and taken names of many nodes about to be made in `tx` (hostname,
    WireGuard key, node key each): a group-commit `prepare` step (coordinator/groupcommit.py)."""
    bases = [dns_label(h) for h, _, _ in candidates]
    with tx.session.no_autoflush:
        rows = (
            await tx.session.execute(
                _clash_query(bases, [wg for _, wg, _ in candidates], [nk for _, _, nk in candidates])
            )
        ).all()
    covered = set(zip(bases, (wg for _, wg, _ in candidates), (nk for _, _, nk in candidates), strict=True))
    tx.session.info[_FOUND] = (covered, [(name, wg, nk) for name, wg, nk in rows])


def _prefetched(tx: Tx, base: str, wg: str, nk: str) -> list[tuple[str, str, str]] | None:
    """This node's share of :func:`prefetch_clashes`' rows, or None when it was not among them."""
    got: tuple[set[tuple[str, str, str]], list[tuple[str, str, str]]] | None = tx.session.info.get(_FOUND)
    if got is None or (base, wg, nk) not in got[0]:
        return None
    return [r for r in got[1] if r[1] == wg or r[2] == nk or r[0] == base or r[0].startswith(f"{base}-")]


async def create_node(
    tx: Tx,
    *,
    hostname: str,
    wg_public_key: str,
    node_public_key: str,
    user_id: int | None,
    tags: tuple[str, ...],
    actor: str,
    how: str,
    ephemeral: bool = False,
) -> Enrolled:
    s = tx.session
    base = dns_label(hostname)
    now = time.time()
    # one query for the key clash and the names like `base` (or its share of the one query for the whole
    # group: prefetch_clashes); the nodes this transaction made are not in
    # the database yet (no flush per node: the group's rows go in together at its commit), so they are
    # checked in memory. `base-...` as a range, not LIKE: the name index serves it.
    made = _made_here(tx)
    found = _prefetched(tx, base, wg_public_key, node_public_key)
    if found is None:
        with s.no_autoflush:
            rows = (await s.execute(_clash_query([base], [wg_public_key], [node_public_key]))).all()
        found = [(name, wg, nk) for name, wg, nk in rows]
    if (
        wg_public_key in made.keys
        or node_public_key in made.keys
        or any(wg == wg_public_key or nk == node_public_key for _, wg, nk in found)
    ):
        raise Conflict("this WireGuard or node key is already enrolled")
    taken = {name for name, _, _ in found} | made.names
    # Names that would make the node look like someone else get a suffix, like a taken name: a removed
    # node's name still in quarantine (policy or peers' hosts files may still mean the old node), a user's
    # name (a node named "alice" is not user alice, but it would read as her machine), and reserved names
    # (localhost, wpad, gateway, the mesh domain's own labels...) and admin DNS records' names (`dns set
    # printer IP`: a node enrolled as "printer" would otherwise answer for the printer on some hosts).
    held, others = await _held_names(tx, now)
    taken |= others
    name = unique_name(base, taken)
    node_id = await _next_node_id(tx)
    try:
        ipv4, ipv6 = tx.core.pool.allocate(avoid=[ip for _, ip in held if ip is not None])
    except IpamError as exc:
        raise Conflict(str(exc)) from None
    tx.on_rollback(lambda: tx.core.pool.release(ipv4))
    node = Node(
        id=node_id,
        name=name,
        user_id=user_id,
        ipv4=ipv4,
        ipv6=ipv6,
        wg_public_key=wg_public_key,
        node_public_key=node_public_key,
        tags=json.dumps(list(tags)),
        endpoints="[]",
        cert="",
        created_at=now,
        expired=False,
        ephemeral=ephemeral,
    )
    s.add(node)
    made.names.add(name)
    made.keys.update((wg_public_key, node_public_key))
    cert = await _issue(tx, node, now)
    tx.change("added", node.id)
    await tx.audit(
        actor,
        "node.enrolled",
        f"node:{name}",
        {
            "node_id": node.id,
            "how": how,
            "ipv4": ipv4,
            "ipv6": ipv6,
            "wg_public_key": wg_public_key,
            "node_public_key": node_public_key,
            **({"ephemeral": True} if ephemeral else {}),
        },
    )
    core = tx.core
    peer = peer_of(node)
    node_key = b64decode(node_public_key)
    with s.no_autoflush:
        owner = (await s.get(User, user_id)) if user_id is not None else None
    owner_name = owner.name if owner is not None else ""

    def commit() -> None:
        core.state.owners[peer.node_id] = owner_name
        core.state.put_peer(peer)
        core.node_keys[peer.node_id] = (node_key, False)
        core.metrics.enrollments.inc()
        core.metrics.nodes.set(len(core.state.peers))

    tx.on_commit(commit)
    return Enrolled(node.id, name, peer.ips, cert)


async def list_nodes(core: Core) -> list[NodeInfo]:
    from meshd.proto import cert as certfmt

    async with core.read() as s:
        rows = (
            await s.execute(
                select(Node, User.name).outerjoin(User, Node.user_id == User.id).order_by(Node.id)
            )
        ).all()
    out = []
    for node, user in rows:
        try:
            not_after: int | None = certfmt.decode(node.cert)[0].not_after
        except certfmt.CertError:
            not_after = None
        peer = core.state.peers.get(node.id)
        out.append(
            NodeInfo(
                node.id,
                node.name,
                user,
                node.ipv4,
                node.ipv6,
                node.wg_public_key,
                node.node_public_key,
                tuple(json.loads(node.tags)),
                node.created_at,
                node.expired,
                bool(peer and peer.online),
                peer.endpoints if peer else (),
                not_after,
            )
        )
    return out


async def by_name(tx: Tx, name: str, *, live: bool = False) -> Node:
    """The node called ``name`` (NotFound if none; with ``live``, also if it expired)."""
    node = (await tx.session.execute(select(Node).where(Node.name == name))).scalar_one_or_none()
    if node is None or (live and node.expired):
        raise NotFound(f"unknown node {name!r}")
    return node


def _revoke(tx: Tx, node_id: int, reason: str, expired: bool, key: bytes) -> None:
    core = tx.core

    def commit() -> None:
        core.state.drop_peer(node_id)
        if expired:
            core.node_keys[node_id] = (key, True)
        else:
            core.node_keys.pop(node_id, None)
        core.hub.disconnect(node_id, reason)
        for hook in core.revoke_hooks:
            hook(node_id, reason)
        core.metrics.nodes.set(len(core.state.peers))

    tx.on_commit(commit)


def _quarantine(tx: Tx, node: Node, name: str, ipv4: str | None) -> float | None:
    """Keep `name` (and `ipv4`) from new nodes for the quarantine period; the end, or None when off."""
    period = tx.core.settings.quarantine
    if period <= 0:
        return None
    until = time.time() + period
    tx.session.add(Quarantine(name=name, ipv4=ipv4, node_id=node.id, until=until))
    return until


async def remove_node(
    core: Core, name: str, actor: str, release: bool = False, details: dict[str, object] | None = None
) -> None:
    """Remove a node; its name and address stay in quarantine unless `release`.

    With `release`, a name that is no longer a node but still in quarantine is released (that is how an
    admin lets a new node have a removed node's name and address before the period ends)."""
    async with core.transaction() as tx:
        node = (await tx.session.execute(select(Node).where(Node.name == name))).scalar_one_or_none()
        if node is None:
            if release and await _release(tx, name, actor):
                return
            raise NotFound(f"unknown node {name!r}")
        await tx.session.delete(node)
        tx.change("removed", node.id)
        until = None if release else _quarantine(tx, node, name, node.ipv4)
        if release:
            await _release(tx, name, actor)
        record: dict[str, object] = {"node_id": node.id, "ipv4": node.ipv4, **(details or {})}
        record.update({"released": True} if release else {"quarantine_until": until})
        await tx.audit(actor, "node.removed", f"node:{name}", record)
        _revoke(tx, node.id, "node removed", False, b"")
        ipv4 = node.ipv4
        tx.on_commit(lambda: core.pool.release(ipv4))


async def _release(tx: Tx, name: str, actor: str) -> bool:
    """End the quarantine of `name` and of the addresses held with it; False when none was held."""
    rows = (await tx.session.execute(select(Quarantine).where(Quarantine.name == name))).scalars().all()
    for row in rows:
        await tx.session.delete(row)
        await tx.audit(
            actor, "quarantine.released", f"node:{name}", {"node_id": row.node_id, "ipv4": row.ipv4}
        )
    return bool(rows)


async def expire_node(core: Core, name: str, actor: str) -> None:
    async with core.transaction() as tx:
        node = await by_name(tx, name)
        if node.expired:
            raise Conflict(f"node {name!r} is already expired")
        node.expired = True
        tx.change("removed", node.id)
        await tx.audit(actor, "node.expired", f"node:{name}", {"node_id": node.id})
        _revoke(tx, node.id, "node expired", True, b64decode(node.node_public_key))


async def _reissue_and_publish(tx: Tx, node: Node) -> None:
    await _issue(tx, node, time.time())
    tx.change("changed", node.id)
    core = tx.core
    if not node.expired:
        peer = core.state.peers.get(node.id)
        online = bool(peer and peer.online)
        new = peer_of(node, online=online, relay_home=peer.relay_home if peer else 1)
        tx.on_commit(lambda: core.state.put_peer(new))


async def rename_node(core: Core, old: str, new: str, actor: str) -> None:
    if not is_dns_label(new):
        raise BadRequest(f"bad node name {new!r}: one DNS label (a-z, 0-9, '-'), at most 63 characters")
    async with core.transaction() as tx:
        node = await by_name(tx, old)
        if old == new:
            return
        if (await tx.session.execute(select(Node.id).where(Node.name == new))).first() is not None:
            raise Conflict(f"node name {new!r} is taken")
        if new in reserved_names(core.settings.domain):
            raise BadRequest(f"node name {new!r} is reserved (it means something else to resolvers)")
        if (await tx.session.execute(select(DnsRecord.id).where(DnsRecord.name == new))).first() is not None:
            raise Conflict(f"node name {new!r} is a DNS record's name (coordinator dns remove {new} first)")
        # the old name may still be in peers' hosts files and in node:OLD rules: no new node takes it
        _quarantine(tx, node, old, None)
        node.name = new
        await tx.session.flush()
        await tx.audit(actor, "node.renamed", f"node:{new}", {"node_id": node.id, "old_name": old})
        await _reissue_and_publish(tx, node)


async def tag_node(core: Core, name: str, tags: list[str], actor: str) -> tuple[str, ...]:
    clean = check_tags(tags)
    async with core.transaction() as tx:
        node = await by_name(tx, name)
        node.tags = json.dumps(list(clean))
        await tx.audit(actor, "node.tagged", f"node:{name}", {"node_id": node.id, "tags": list(clean)})
        await _reissue_and_publish(tx, node)
    return clean


async def set_peer_relay(core: Core, name: str, on: bool, actor: str) -> bool:
    """Make a node a peer relay (it serves UDP relay ports for pairs the coordinator offers it to) or
    stop it (issue 14); audited. Its offers end within one planning round (coordinator/peerrelays.py)."""
    async with core.transaction() as tx:
        node = await by_name(tx, name)
        if node.peer_relay != on:
            node.peer_relay = on
            await tx.audit(actor, "node.peer_relay", f"node:{name}", {"node_id": node.id, "on": on})
    return on


async def renew_cert(core: Core, node_id: int) -> str:
    async with core.transaction() as tx:
        node = await tx.session.get(Node, node_id)
        if node is None:
            raise Forbidden("unknown node")
        if node.expired:
            raise Forbidden("node expired: re-enroll it")
        await _reissue_and_publish(tx, node)
        return node.cert


log = logging.getLogger(__name__)


_Report = tuple[tuple[str, ...] | None, bool | None]  #: (endpoints, online): one of the two is set

#: writes a node's endpoints (or online flag) may make at once before the 1-per-interval rate applies: a
#: starting node reports its candidates two or three times within a second (local, then STUN-mapped ones)
#: and its peers need the last of them at once for a direct path (netns/test_meshd.py, test_traversal.py)
WRITE_BURST = 3.0
#: per core (tests build several): keyed by (node id, "endpoints" | "presence"). Endpoints and the online
#: flag have separate windows: a connect (online) is followed at once by the node's candidates, and those
#: must not wait for the window (direct paths form on them).
_coalescers: weakref.WeakKeyDictionary[Core, Coalescer[tuple[int, str], _Report]] = (
    weakref.WeakKeyDictionary()
)


async def set_endpoints(
    core: Core, node_id: int, endpoints: tuple[str, ...] | None, online: bool | None
) -> None:
    """Record reported candidates and/or the online flag and tell peers (compact endpoints delta).

    Coalesced (coordinator/coalesce.py): a flapping node writes (and fans out to every peer) each of the
    two in a burst of WRITE_BURST, then at most once per ``endpoint_write_interval``; a change within the
    window is held, the last one wins.
    """
    interval = core.settings.endpoint_write_interval
    if interval <= 0:
        await _write_endpoints(core, node_id, endpoints, online)
        return
    coalescer = _coalescers.get(core)
    if coalescer is None:

        async def write(key: tuple[int, str], value: _Report) -> None:
            await _write_endpoints(core, key[0], *value)

        coalescer = _coalescers[core] = Coalescer(
            HeldWrites(interval, WRITE_BURST), write, clock=time.monotonic, tasks=core.held_writes
        )
    if endpoints is not None:
        await coalescer.submit((node_id, "endpoints"), (endpoints, None))
    if online is not None:
        await coalescer.submit((node_id, "presence"), (None, online))


async def _write_endpoints(
    core: Core, node_id: int, endpoints: tuple[str, ...] | None, online: bool | None
) -> None:
    peer = core.state.peers.get(node_id)
    if peer is None:
        return
    # replicas (coordinator/presence.py): this replica's stream count always goes to the database; the
    # node is online while it streams to any replica
    shared = online is not None and core.presence is not None
    if (
        not shared
        and (endpoints is None or endpoints == peer.endpoints)
        and (online is None or online == peer.online)
    ):
        return
    if endpoints is None and online is not None and not shared:
        # the flag alone (one replica): committed together with others (onlineflags.py)
        await onlineflags.writer(core).write(node_id, online)
        return
    async with core.transaction() as tx:
        if shared:
            assert core.presence is not None and online is not None
            online = await core.presence.set_local(tx.session, node_id, online)
            peer = core.state.peers.get(node_id)  # the transaction caught up with other replicas
            if peer is None:
                return
            if (endpoints is None or endpoints == peer.endpoints) and online == peer.online:
                return  # the presence row alone changed: commits, nothing to tell peers
        if endpoints is not None and endpoints != peer.endpoints:
            node = await tx.session.get(Node, node_id)
            if node is None:
                return
            node.endpoints = json.dumps(list(endpoints))
        tx.change(
            "endpoints" if endpoints is not None and endpoints != peer.endpoints else "presence", node_id
        )

        def commit() -> None:
            core.state.set_endpoints(node_id, endpoints, online)

        tx.on_commit(commit)


def presence_applier(core: Core, node_id: int, online: bool) -> Callable[[], None]:
    """The in-memory effect of a committed presence change (coordinator/presence.py)."""

    def apply() -> None:
        core.state.set_endpoints(node_id, None, online)

    return apply


async def get_policy(core: Core) -> str:
    return core.state.policy


async def set_policy(core: Core, text: str, actor: str) -> None:
    """Validate (syntax, names, the policy's own tests against the live nodes), then store and publish."""
    if text.strip():
        async with core.read() as s:
            users = set((await s.execute(select(User.name))).scalars().all())
        members = [core.state.member(i) for i in core.state.sorted_ids()]
        try:
            access.check(text, users, members)
        except access.PolicyError as exc:
            raise BadRequest("policy rejected (the stored policy is unchanged):\n" + str(exc)) from None
    async with core.transaction() as tx:
        row = await tx.session.get(Meta, "policy")
        if row is None:
            tx.session.add(Meta(key="policy", value=text))
        else:
            row.value = text
        tx.change("policy")
        import hashlib

        await tx.audit(
            actor,
            "policy.changed",
            "policy",
            {"sha256": hashlib.sha256(text.encode()).hexdigest(), "bytes": len(text.encode())},
        )

        def commit() -> None:
            core.state.policy = text

        tx.on_commit(commit)
