"""Tables. Times are unix seconds (float) unless named otherwise; JSON lists are stored as text."""

from __future__ import annotations

from sqlalchemy import Boolean, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.expression import false


class Base(DeclarativeBase):
    pass


class Meta(Base):
    """Small key/value facts about the network: map version, ULA prefix, policy, audit head, serials."""

    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float] = mapped_column(Float)


class PreAuthKey(Base):
    """A pre-auth key: only its SHA-256 is stored; `prefix` is the first characters for display."""

    __tablename__ = "preauth_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    reusable: Mapped[bool] = mapped_column(Boolean)
    tags: Mapped[str] = mapped_column(Text, default="[]")
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)
    used_count: Mapped[int] = mapped_column(Integer, default=0)
    #: nodes enrolled with it are removed when offline too long or on `meshd down` (coordinator/ephemeral.py)
    ephemeral: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class Node(Base):
    __tablename__ = "nodes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), nullable=True)
    ipv4: Mapped[str] = mapped_column(String(45), unique=True)
    ipv6: Mapped[str] = mapped_column(String(45), unique=True)
    wg_public_key: Mapped[str] = mapped_column(String(64), unique=True)
    node_public_key: Mapped[str] = mapped_column(String(64), unique=True)
    tags: Mapped[str] = mapped_column(Text, default="[]")
    endpoints: Mapped[str] = mapped_column(Text, default="[]")
    cert: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float)
    expired: Mapped[bool] = mapped_column(Boolean, default=False)
    ephemeral: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())  #: issue 17
    #: serves UDP relay ports for other nodes (`coordinator nodes relay NAME on`, issue 14)
    peer_relay: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    #: the relay region the node made its home (coordinator/replicarelays.py; None: no home)
    relay_home: Mapped[int | None] = mapped_column(Integer, nullable=True, default=1, server_default="1")


class Quarantine(Base):
    """A removed or renamed node's name (and a removed node's IPv4 address; IPv6 has the same index)
    that no new node gets before `until`: policy rules, firewall rules and peers' hosts files may still
    name the old node by them. `coordinator nodes remove NAME --release` deletes the row early."""

    __tablename__ = "quarantine"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(63), index=True)
    ipv4: Mapped[str | None] = mapped_column(String(45), nullable=True, index=True)
    node_id: Mapped[int] = mapped_column(Integer)
    until: Mapped[float] = mapped_column(Float, index=True)


class DnsRecord(Base):
    """An admin-defined DNS record (`coordinator dns set NAME IP`, coordinator/dnsrecords.py)."""

    __tablename__ = "dns_records"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(253), unique=True)
    ip: Mapped[str] = mapped_column(String(45))
    created_at: Mapped[float] = mapped_column(Float)


class Challenge(Base):
    """A used enrollment challenge's marker (SHA-256; `ephemeral_private` empty: challenges are stateless
    since issue 16, coordinator/challenges.py), or a challenge an older coordinator issued with its ephemeral
    X25519 private key. Purged after `expires_at`."""

    __tablename__ = "challenges"
    challenge: Mapped[str] = mapped_column(String(64), primary_key=True)
    ephemeral_private: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[float] = mapped_column(Float)


class PendingEnrollment(Base):
    """A node waiting for `coordinator nodes approve CODE`."""

    __tablename__ = "pending_enrollments"
    code: Mapped[str] = mapped_column(String(16), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    wg_public_key: Mapped[str] = mapped_column(String(64))
    node_public_key: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)
    node_id: Mapped[int | None] = mapped_column(Integer, nullable=True)


class Nonce(Base):
    """Nonces of signed requests seen within the timestamp window (replay protection across replicas)."""

    __tablename__ = "nonces"
    nonce: Mapped[str] = mapped_column(String(100), primary_key=True)
    expires_at: Mapped[float] = mapped_column(Float, index=True)


class MapChange(Base):
    """The change log behind map versions: which node (or map-wide item) changed at which version."""

    __tablename__ = "map_changes"
    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    #: added | changed | endpoints | presence | removed | policy | relays | restart
    kind: Mapped[str] = mapped_column(String(16))
    node_id: Mapped[int | None] = mapped_column(Integer, nullable=True)


class AuditRecord(Base):
    """Append-only audit trail; `hash` = SHA-256 over the canonical record including `prev_hash`."""

    __tablename__ = "audit"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    time: Mapped[str] = mapped_column(String(40), index=True)  #: ix_audit_time (migration 0008)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    object: Mapped[str] = mapped_column(String(255))
    details: Mapped[str] = mapped_column(Text)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditCheckpoint(Base):
    """A signed statement "the audit chain's record `seq` has hash `head_hash`" (coordinator/audit.py).

    Made with the coordinator's signing key, which is not in the database: rewriting a record before a
    checkpoint, even with every later hash recomputed, no longer matches a signature."""

    __tablename__ = "audit_checkpoints"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    head_hash: Mapped[str] = mapped_column(String(64))
    time: Mapped[str] = mapped_column(String(40))
    key_id: Mapped[str] = mapped_column(String(64))
    signature: Mapped[str] = mapped_column(String(128))


class Route(Base):
    """A prefix a node advertises (subnet router; 0.0.0.0/0 and ::/0: exit node) and whether the admin
    approved it. Peers route a prefix through the node only when it is both (coordinator/routes.py)."""

    __tablename__ = "routes"
    __table_args__ = (UniqueConstraint("node_id", "prefix", name="uq_routes_node_prefix"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"))
    prefix: Mapped[str] = mapped_column(String(64))
    advertised: Mapped[bool] = mapped_column(Boolean)
    approved: Mapped[bool] = mapped_column(Boolean)


class AdminToken(Base):
    """A scoped admin API token (coordinator/tokens.py): only its SHA-256 is stored, like pre-auth keys."""

    __tablename__ = "admin_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))  #: the first characters, for display
    scope: Mapped[str] = mapped_column(String(16))  #: read | nodes | keys | policy | audit | admin
    description: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_used_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class SharedSecret(Base):
    """A secret every replica must agree on (signing key, relay secret, ...: coordinator/sharedsecrets.py),
    sealed (NaCl SecretBox, base64) with the at-rest key whose id `key_id` names (migration 0009)."""

    __tablename__ = "shared_secrets"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(32))
    sealed: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[float] = mapped_column(Float)


class Replica(Base):
    """A running coordinator replica; `last_seen` is its heartbeat in the database's clock
    (coordinator/presence.py). A replica not seen for presence.REPLICA_TIMEOUT is dead."""

    __tablename__ = "replicas"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    started_at: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float] = mapped_column(Float, index=True)
    #: its embedded relay's relay map entry, JSON (coordinator/replicarelays.py); None: no embedded relay
    relay: Mapped[str | None] = mapped_column(Text, nullable=True)


class NodePresence(Base):
    """Node `node_id` holds a map stream on replica `replica_id`: it is online while any such row exists."""

    __tablename__ = "node_presence"
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True)
    replica_id: Mapped[str] = mapped_column(ForeignKey("replicas.id", ondelete="CASCADE"), primary_key=True)
    since: Mapped[float] = mapped_column(Float)
