"""The running coordinator: database, signing keys, in-memory map state, the stream hub and metrics.

All mutations go through :meth:`Core.transaction`, which serialises writers (one asyncio lock per
process; the audit chain adds a PostgreSQL advisory lock), allocates map versions, and applies the
in-memory effects and wakes the hub only after the commit succeeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from sqlalchemy import delete, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from coordinator import (
    acting,
    audit,
    auditexport,
    certs,
    presence,
    replicarelays,
    resumption,
    sharedsecrets,
)
from coordinator.db.engine import make_engine, migrate
from coordinator.db.models import MapChange, Meta, Node, User
from coordinator.hub import Hub
from coordinator.ipam import AddressPool, random_ula48
from coordinator.mapstate import Change, MapState
from coordinator.presence import Presence
from coordinator.settings import Settings, prepare_state_dir
from meshd.proto.encoding import b64decode
from meshd.proto.netmap import Peer, RelayRegion

log = logging.getLogger("coordinator")

PG_WRITE_LOCK = 0x6D657368 + 1  #: cluster-wide advisory lock serialising writers across replicas
NOTIFY_CHANNEL = "coordinator_map"
#: call-me-maybe signals for a node streaming to another replica: "NODE_ID TEXT" (the encoded message)
SIGNAL_CHANNEL = "coordinator_signal"
SIGNAL_NOTIFY_MAX = 7900  #: PostgreSQL's NOTIFY payload limit is 8000 bytes


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.connected = Gauge(
            "coordinator_connected_nodes", "Nodes with an open map stream", registry=self.registry
        )
        self.version = Gauge("coordinator_map_version", "Current network map version", registry=self.registry)
        self.nodes = Gauge("coordinator_nodes", "Enrolled, unexpired nodes", registry=self.registry)
        self.enrollments = Counter("coordinator_enrollments", "Nodes enrolled", registry=self.registry)
        self.pushes = Counter(
            "coordinator_map_messages_sent", "Map messages queued to streams", registry=self.registry
        )
        self.latency = Histogram(
            "coordinator_request_seconds", "HTTP request latency", ["route"], registry=self.registry
        )


@dataclass
class Tx:
    """One write transaction: a session plus effects to run after commit."""

    core: Core
    session: AsyncSession
    after: list[Callable[[], None]] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)
    undo: list[Callable[[], None]] = field(default_factory=list)
    #: run (in order) after the caller's work and before the commit, inside the transaction: writes that
    #: many units of one group-commit transaction add up (e.g. a reusable pre-auth key's use count)
    before: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    def change(self, kind: str, node_id: int | None = None) -> int:
        version = self.core.state.version + len(self.changes) + 1
        self.changes.append(Change(version, kind, node_id))
        self.session.add(MapChange(version=version, kind=kind, node_id=node_id))
        return version

    def on_commit(self, fn: Callable[[], None]) -> None:
        self.after.append(fn)

    def on_rollback(self, fn: Callable[[], None]) -> None:
        self.undo.append(fn)

    def before_commit(self, fn: Callable[[], Awaitable[None]]) -> None:
        self.before.append(fn)

    async def audit(self, actor: str, action: str, obj: str, details: dict[str, Any] | None = None) -> None:
        actor = acting.actor(actor)  # `admin` through a token is `token:ID` (coordinator/acting.py)
        # the active key signs the audit checkpoints due with this record (coordinator/audit.py)
        signer = self.core.keys.active_seed
        # a pre-auth key or token typed where a name goes is cut (the trail is copied to log systems)
        obj, details = auditexport.redact(obj), auditexport.redact_details(details or {})
        if details and self.core.audit_ip_prefix is not None:  # privacy: --audit-ip-prefix
            details = auditexport.truncate_ips(details, self.core.audit_ip_prefix)
        entry = await audit.append(self.session, actor, action, obj, details, signer=signer)
        if entry.checkpointed:
            self.on_commit(lambda: self.core.anchor_audit(entry.id, entry.hash))
        if self.core.audit_export:
            self.on_commit(lambda: self.core.audit_export.export(entry))


class Core:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = make_engine(settings.database_url)
        # audit.verify finds the keys that may have signed audit checkpoints here (the admin API's session)
        self.sessions = async_sessionmaker(
            self.engine,
            expire_on_commit=False,
            info={
                audit.SESSION_KEYS: lambda: self.keys.trusted,
                audit.SESSION_ANCHOR: lambda: audit.read_anchor(self.settings.state_dir),
            },
        )
        self.keys: certs.SigningKeys
        region_id = settings.relay_region_id or 1  # PostgreSQL, automatic (0): chosen at start
        embedded = RelayRegion(
            region_id,
            replicarelays.region_name(region_id),
            settings.url,
            settings.stun_port,
            settings.listen_ipv6_addr or "",
        )
        #: the embedded relay's region (coordinator/replicarelays.py); the other live replicas' regions
        self.relay_region = embedded if settings.relay else None
        self.replica_regions: dict[int, RelayRegion] = {}
        self.state = MapState(
            domain=settings.domain,
            relays=(embedded,) if settings.relay else (),
            log_keep=settings.change_log_keep,
            signing_seed=lambda: self.keys.active_seed,  # maps and deltas are signed (meshd verifies)
        )
        self.hub = Hub(self.state, settings.coalesce, on_sent=self._count_pushes)
        #: held writes waiting for their coalescing window (nodes.set_endpoints): cancelled at stop
        self.held_writes: set[asyncio.Task[None]] = set()
        self.pool: AddressPool
        self.node_keys: dict[int, tuple[bytes, bool]] = {}  #: node id -> (Ed25519 public key, expired)
        self.metrics = Metrics()
        self._lock = asyncio.Lock()
        self._started = False
        self._janitor: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._reaper: asyncio.Task[None] | None = None  #: removes ephemeral nodes gone too long
        #: marks offline the nodes online before a graceful restart that did not come back (onlineflags.py)
        self._settle: asyncio.Task[None] | None = None
        #: called with (node id, reason) right after a node is removed or expired (the relay drops it)
        self.revoke_hooks: list[Callable[[int, str], None]] = []
        self.audit_export = auditexport.AuditExport()  #: opened by start() (--audit-syslog, --audit-jsonl)
        self.audit_ip_prefix = (
            auditexport.parse_ip_prefix(settings.audit_ip_prefix) if settings.audit_ip_prefix else None
        )
        self._retention: asyncio.Task[None] | None = None
        #: replicas (issue 16): the at-rest key of the shared secrets (coordinator/sharedsecrets.py), and
        #: this replica's heartbeat and node presence on PostgreSQL (coordinator/presence.py)
        self.secrets_key = sharedsecrets.key_from(settings.secrets_key_file)
        self.secrets_shared = False
        self.presence: Presence | None = None
        self._heartbeat: asyncio.Task[None] | None = None

    def _count_pushes(self, n: int) -> None:
        self.metrics.pushes.inc(n)

    # ------------------------------------------------------------------------------ life cycle
    async def start(self) -> None:
        prepare_state_dir(self.settings.state_dir)
        await migrate(self.engine)
        self.audit_export = auditexport.AuditExport(self.settings.audit_syslog, self.settings.audit_jsonl)
        async with self.transaction() as tx:  # before the keys are read: they may come from the database
            self.secrets_shared = await sharedsecrets.sync(
                tx.session, self.settings.state_dir, self.secrets_key
            )
        self.keys = certs.load_or_create(self.settings.state_dir)
        if self.is_postgres:
            self.presence = Presence(self)
        async with self.transaction() as tx:
            s = tx.session
            online: set[int] = set()
            orphans: set[int] = set()  #: nodes online on a replica that died (a crash of every replica)
            if self.presence is not None:
                _, orphans = await self.presence.drop_dead(s, await presence.db_now(s))
                await self._choose_relay_region(s)
                await self.presence.register(s)
                online = await self.presence.online_among(s)  # nodes streaming to the other replicas
            ula = await s.get(Meta, "ula48")
            if ula is None:
                ula = Meta(key="ula48", value=random_ula48())
                s.add(ula)
            policy = await s.get(Meta, "policy")
            self.state.policy = policy.value if policy else ""
            from coordinator import dnsrecords  # it imports this module

            self.state.dns_records = await dnsrecords.load(s)
            self.pool = AddressPool(self.settings.prefix, ula.value)
            last = (await s.execute(select(func.max(MapChange.version)))).scalar()
            self.state.version = int(last or 0)
            from coordinator import onlineflags  # it imports this module

            # SQLite: the online flags a graceful stop left (None: a crash, or PostgreSQL, where the other
            # replicas' presence rows above are the truth)
            restored = None if self.is_postgres else await onlineflags.take(s, self.state.version)
            recent = (
                (
                    await s.execute(
                        select(MapChange)
                        .where(MapChange.version > self.state.version - self.settings.change_log_keep)
                        .order_by(MapChange.version)
                    )
                )
                .scalars()
                .all()
            )
            for row in recent:
                self.state.log.append(Change(row.version, row.kind, row.node_id))
            owners = await s.execute(select(Node.id, User.name).join(User, Node.user_id == User.id))
            self.state.owners.update({i: name for i, name in owners.all()})
            from coordinator import routes  # here: coordinator.routes imports this module

            self.state.routes.update(await routes.load(s))
            for node in (await s.execute(select(Node))).scalars().all():
                self.pool.mark(node.ipv4)
                self.node_keys[node.id] = (b64decode(node.node_public_key), node.expired)
                if not node.expired:
                    was_online = node.id in online or (restored is not None and node.id in restored)
                    self.state.put_peer(peer_of(node, online=was_online, relay_home=node.relay_home))
            # streams from before this start get a full map, unless the last stop was graceful and left the
            # online flags (coordinator/onlineflags.py): then they resume with the delta since their version.
            # PostgreSQL: the database holds all of the map, presence rows included, and every change to it is
            # in the change log, so streams always resume (coordinator/resumption.py)
            if self.is_postgres:
                resumption.orphans_offline(tx, orphans, online)
                tx.change("relays")  # our relay region joins the other replicas' relay maps
            tx.change("restart" if restored is None and not self.is_postgres else "resume")
            signed = await audit.checkpoint(s, self.keys.active_seed)  # also anchors a trail from before them
            if signed is not None:
                tx.on_commit(lambda: self.anchor_audit(*signed))
        self.metrics.nodes.set(len(self.state.peers))
        self.hub.start()
        self._janitor = asyncio.create_task(self._clean_up(), name="janitor")
        from coordinator import ephemeral  # it imports this module

        timeout = self.settings.ephemeral_timeout
        self._reaper = asyncio.create_task(ephemeral.run(self, timeout), name="ephemeral-nodes")
        if self.settings.audit_retention > 0:
            from coordinator import auditretention  # it imports this module

            keep = self.settings.audit_retention
            self._retention = asyncio.create_task(auditretention.run(self, keep), name="audit-retention")
        self._started = True
        if restored:
            settle = onlineflags.settle(self, restored)
            self._settle = asyncio.create_task(settle, name="presence-after-restart")
        if self.is_postgres:
            self._listener = asyncio.create_task(self._listen(), name="replica-sync")
        if self.presence is not None:
            self._heartbeat = asyncio.create_task(self.presence.run(), name="replica-heartbeat")
        log.info("coordinator started: map version %d, %d nodes", self.state.version, len(self.state.peers))

    async def stop(self) -> None:
        tasks = (self._janitor, self._listener, self._retention, self._reaper, self._heartbeat, self._settle)
        for task in (*tasks, *self.held_writes):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._janitor = self._listener = self._retention = self._reaper = None
        self._heartbeat = self._settle = None
        await self.hub.stop()
        if self.presence is not None and self._started:
            try:  # our nodes go offline now (or stay online on the replica they reconnect to)
                await self.presence.leave()
            except Exception:  # the database may be gone; the other replicas reap us after the timeout
                log.warning("could not drop this replica's presence at stop", exc_info=True)
        if self._started:
            self._started = False
            if not self.is_postgres:
                from coordinator import onlineflags  # it imports this module

                try:
                    await onlineflags.save(self)
                except Exception:  # the next start sends full maps instead
                    log.warning("could not save the online flags at stop", exc_info=True)
            try:
                await self.checkpoint_audit()
            except Exception:  # the database may be gone; the next start signs the head instead
                log.warning("could not sign the audit head at stop", exc_info=True)
        self.audit_export.close()
        await self.engine.dispose()

    async def _clean_up(self) -> None:
        """Forget expired nonces, challenges and old change-log rows once a minute."""
        from coordinator.db.models import Challenge, Nonce

        while True:
            await asyncio.sleep(60)
            try:
                now = time.time()
                async with self.transaction() as tx:
                    await tx.session.execute(delete(Nonce).where(Nonce.expires_at < now))
                    await tx.session.execute(delete(Challenge).where(Challenge.expires_at < now))
                    floor = self.state.version - self.settings.change_log_keep
                    await tx.session.execute(delete(MapChange).where(MapChange.version < floor))
            except Exception:  # pragma: no cover - retried next minute
                log.exception("clean-up failed")

    async def share_secrets(self, tx: Tx) -> None:
        """The signing key files changed (rotation): seal them into the database for the other replicas."""
        if self.secrets_shared and self.secrets_key is not None:
            names = ("signing_key", "trusted_keys", "endorsements")
            await sharedsecrets.store(tx.session, self.settings.state_dir, self.secrets_key, names)
            tx.change("secrets")

    async def checkpoint_audit(self) -> int | None:
        """Sign the audit chain's current head (done at start and stop); returns its record id."""
        async with self.transaction() as tx:
            signed = await audit.checkpoint(tx.session, self.keys.active_seed)
            if signed is not None:
                tx.on_commit(lambda: self.anchor_audit(*signed))
        return signed[0] if signed is not None else None

    def anchor_audit(self, seq: int, head: str) -> None:
        """The newest signed checkpoint, also outside the database (coordinator/audit.py)."""
        try:
            audit.write_anchor(self.settings.state_dir, seq, head)
        except OSError as exc:  # committed already; the next checkpoint writes it again
            log.warning("cannot write the audit anchor: %s", exc.strerror)

    # ----------------------------------------------------------------------------- transactions
    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        """A serialised write transaction.

        On PostgreSQL several coordinator replicas may share the database: each write transaction takes a
        cluster-wide advisory lock, first catches up with changes other replicas committed (so versions
        and addresses never collide), and announces its new version with NOTIFY at commit.
        """
        async with self._lock, self.sessions() as session:
            tx = Tx(self, session)
            try:
                async with session.begin():
                    if self.is_postgres:
                        await session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PG_WRITE_LOCK})
                        if self._started:
                            await self._catch_up(session)
                    yield tx
                    for hook in tx.before:
                        await hook()
                    if self.is_postgres and tx.changes:
                        await session.execute(
                            text("SELECT pg_notify(:c, :v)"),
                            {"c": NOTIFY_CHANNEL, "v": str(tx.changes[-1].version)},
                        )
            except BaseException:
                for fn in tx.undo:
                    fn()
                raise
            for change in tx.changes:
                self.state.record(change)
            for fn in tx.after:
                fn()
            if tx.changes:
                self.metrics.version.set(self.state.version)
                self.hub.notify(self.hub.delay_for({c.kind for c in tx.changes}))

    # ------------------------------------------------------------------------------------ replicas
    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    async def _catch_up(self, session: AsyncSession) -> bool:
        """Apply map changes committed by other replicas since our version to the in-memory state."""
        rows = (
            (
                await session.execute(
                    select(MapChange)
                    .where(MapChange.version > self.state.version)
                    .order_by(MapChange.version)
                )
            )
            .scalars()
            .all()
        )
        if not rows:
            return False
        ids = {r.node_id for r in rows if r.node_id is not None}
        nodes: dict[int, Node] = {}
        if ids:
            found = (await session.execute(select(Node).where(Node.id.in_(ids)))).scalars().all()
            nodes = {n.id: n for n in found}
            owners = await session.execute(
                select(Node.id, User.name).join(User, Node.user_id == User.id).where(Node.id.in_(ids))
            )
            self.state.owners.update({i: name for i, name in owners.all()})
            from coordinator import routes  # here: coordinator.routes imports this module

            carried = await routes.load(session, ids)
            for i in ids:  # another replica approved or removed a route (issue 17)
                self.state.routes.pop(i, None)
            self.state.routes.update(carried)
        if any(r.kind == "policy" for r in rows):
            policy = await session.get(Meta, "policy")
            self.state.policy = policy.value if policy else ""
        if any(r.kind == "dns" for r in rows):  # another replica changed the admin DNS records
            from coordinator import dnsrecords

            self.state.dns_records = await dnsrecords.load(session)
        if any(r.kind == "relays" for r in rows) and self.presence is not None:
            (await replicarelays.refresh(self, session))()  # a replica's relay region came or went
        if any(r.kind == "secrets" for r in rows) and self.secrets_key is not None:
            # another replica rotated the signing key: take the shared one before signing anything more
            sharedsecrets.write_all(
                self.settings.state_dir, await sharedsecrets.unseal_all(session, self.secrets_key)
            )
            self.keys = certs.load_or_create(self.settings.state_dir)
        online = await self.presence.online_among(session, ids) if self.presence is not None else set()
        for r in rows:  # another replica's restart does not invalidate our streams' versions
            self.state.record(Change(r.version, "noop" if r.kind == "restart" else r.kind, r.node_id))
        for i in ids:
            node, old = nodes.get(i), self.state.peers.get(i)
            if node is not None and not node.expired:
                self.pool.mark(node.ipv4)
                self.node_keys[i] = (b64decode(node.node_public_key), False)
                self.state.put_peer(peer_of(node, online=node.id in online, relay_home=node.relay_home))
                continue
            if node is None:
                self.node_keys.pop(i, None)
                if old is not None:
                    self.pool.release(old.ips[0].split("/")[0])
            else:
                self.node_keys[i] = (b64decode(node.node_public_key), True)
            self.state.drop_peer(i)
            self.hub.disconnect(i, "node removed or expired")
        self.metrics.nodes.set(len(self.state.peers))
        self.metrics.version.set(self.state.version)
        self.hub.notify(self.hub.delay_for({r.kind for r in rows}))
        return True

    async def _choose_relay_region(self, session: AsyncSession) -> None:
        """PostgreSQL: this replica's relay region id (coordinator/replicarelays.py), written into its
        row; the other live replicas' regions join the relay map."""
        assert self.presence is not None
        floor = await presence.db_now(session) - self.presence.timeout
        held = await replicarelays.live_regions(session, floor)
        mine = self.relay_region
        if mine is not None:
            rid = replicarelays.choose_id(
                self.settings.relay_region_id, self.settings.state_dir, mine.url, held
            )
            self.relay_region = replace(mine, id=rid, name=replicarelays.region_name(rid))
            self.presence.relay = replicarelays.encode(self.relay_region)
            held.pop(rid, None)  # our own previous life (a crash less than the timeout ago)
            own = tuple(self.relay_region if r == mine else r for r in self.state.relays)
        else:
            own = self.state.relays
        self.state.relays = replicarelays.merged(own, (), held)
        self.replica_regions = held

    async def forward_signal(self, node_id: int, text_: str) -> bool:
        """Hand a signal to the other replicas (the one `node_id` streams to sends it); False when it is
        too large for a notification or the database is away."""
        payload = f"{node_id} {text_}"
        if len(payload.encode()) > SIGNAL_NOTIFY_MAX:
            return False
        try:
            async with self.sessions() as s, s.begin():
                await s.execute(text("SELECT pg_notify(:c, :v)"), {"c": SIGNAL_CHANNEL, "v": payload})
        except Exception as exc:  # the sender gets "not connected", as for a peer that is gone
            log.warning("cannot forward a signal to the other replicas: %s", exc)
            return False
        return True

    def _deliver_signal(self, payload: str) -> None:
        node, _, message = payload.partition(" ")
        if node.isdigit():
            self.hub.send_to(int(node), message)  # not ours: another replica holds that stream

    async def _listen(self) -> None:
        """Wake up on other replicas' NOTIFY (and poll every few seconds in case one was missed)."""
        import asyncpg
        from sqlalchemy.engine import make_url

        url = make_url(self.settings.database_url)
        woken = asyncio.Event()
        conn = None
        while True:
            try:
                if conn is None or conn.is_closed():
                    conn = await asyncpg.connect(
                        user=url.username,
                        password=url.password,
                        database=url.database,
                        host=url.host or url.query.get("host"),
                        port=url.port,
                    )
                    await conn.add_listener(NOTIFY_CHANNEL, lambda *_: woken.set())
                    await conn.add_listener(SIGNAL_CHANNEL, lambda *a: self._deliver_signal(str(a[-1])))
                # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancellation that comes
                # with a NOTIFY, and stop() then waited for this loop forever (a CI hang)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5.0):
                        await woken.wait()
                woken.clear()
                async with self._lock, self.sessions() as session, session.begin():
                    await self._catch_up(session)
            except asyncio.CancelledError:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
                raise
            except Exception:  # pragma: no cover - database away: retry
                log.warning("replica sync failed; retrying", exc_info=True)
                conn = None
                await asyncio.sleep(1.0)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        async with self.sessions() as session:
            yield session


def peer_of(node: Node, online: bool = False, relay_home: int | None = 1) -> Peer:
    return Peer(
        node_id=node.id,
        name=node.name,
        ips=(f"{node.ipv4}/32", f"{node.ipv6}/128"),
        wg_public_key=node.wg_public_key,
        node_public_key=node.node_public_key,
        cert=node.cert,
        endpoints=tuple(json.loads(node.endpoints)),
        relay_home=relay_home,
        online=online,
        tags=tuple(json.loads(node.tags)),
    )
