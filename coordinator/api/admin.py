"""Admin API, served only on `<state-dir>/admin.sock` (never on the TCP listener)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from coordinator import approvals, audit, auditexport, dnsrecords, enrollment, identity, nodes, rotation
from coordinator import routes as subnet_routes
from coordinator.api.deps import CoreDep
from coordinator.api.schemas import (
    ApproveBody,
    AuditPublic,
    AuditVerifyPublic,
    KeyCreate,
    KeyPublic,
    NodePublic,
    PolicyBody,
    PolicyPublic,
    RenameBody,
    TagsBody,
    UserCreate,
    UserPublic,
)
from coordinator.errors import BadRequest

router = APIRouter(prefix="/admin", tags=["admin"])
ACTOR = "admin"


@router.post("/users", response_model=UserPublic, status_code=201)
async def create_user(body: UserCreate, core: CoreDep) -> UserPublic:
    u = await identity.create_user(core, body.name, ACTOR)
    return UserPublic(id=u.id, name=u.name, created_at=u.created_at)


@router.get("/users", response_model=list[UserPublic])
async def list_users(core: CoreDep) -> list[UserPublic]:
    return [
        UserPublic(id=u.id, name=u.name, created_at=u.created_at) for u in await identity.list_users(core)
    ]


@router.post("/keys", response_model=KeyPublic, status_code=201)
async def create_key(body: KeyCreate, core: CoreDep) -> KeyPublic:
    k = await identity.create_key(
        core, body.user, body.reusable, body.expiration, body.tags, ACTOR, ephemeral=body.ephemeral
    )
    return KeyPublic(
        key=k.key,
        prefix=k.prefix,
        user=k.user,
        reusable=k.reusable,
        expires_at=k.expires_at,
        tags=list(k.tags),
        ephemeral=k.ephemeral,
    )


class DnsRecordBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ip: str = Field(min_length=1, max_length=64)


@router.get("/dns")
async def list_dns(core: CoreDep) -> list[dict[str, object]]:
    """Admin-defined DNS records (issue 17)."""
    return [
        {"name": r.name, "ip": r.ip, "created_at": r.created_at} for r in await dnsrecords.list_records(core)
    ]


@router.put("/dns/{name}")
async def set_dns(name: str, body: DnsRecordBody, core: CoreDep) -> dict[str, object]:
    r = await dnsrecords.set_record(core, name, body.ip, ACTOR)
    return {"name": r.name, "ip": r.ip, "created_at": r.created_at}


@router.delete("/dns/{name}", status_code=204)
async def remove_dns(name: str, core: CoreDep) -> Response:
    await dnsrecords.remove_record(core, name, ACTOR)
    return Response(status_code=204)


@router.get("/nodes", response_model=list[NodePublic])
async def list_nodes(core: CoreDep) -> list[NodePublic]:
    return [
        NodePublic(
            id=n.id,
            name=n.name,
            user=n.user,
            ips=[f"{n.ipv4}/32", f"{n.ipv6}/128"],
            wg_public_key=n.wg_public_key,
            node_public_key=n.node_public_key,
            tags=list(n.tags),
            created_at=n.created_at,
            expired=n.expired,
            online=n.online,
            endpoints=list(n.endpoints),
            cert_not_after=n.cert_not_after,
        )
        for n in await nodes.list_nodes(core)
    ]


@router.delete("/nodes/{name}", status_code=204)
async def remove_node(name: str, core: CoreDep, release: bool = False) -> Response:
    """`release`: no quarantine for the node's name and address (or end the quarantine of a removed one)."""
    await nodes.remove_node(core, name, ACTOR, release=release)
    return Response(status_code=204)


@router.post("/nodes/{name}/expire", status_code=204)
async def expire_node(name: str, core: CoreDep) -> Response:
    await nodes.expire_node(core, name, ACTOR)
    return Response(status_code=204)


@router.post("/nodes/{name}/rename", status_code=204)
async def rename_node(name: str, body: RenameBody, core: CoreDep) -> Response:
    await nodes.rename_node(core, name, body.new_name, ACTOR)
    return Response(status_code=204)


@router.post("/nodes/{name}/tags", response_model=TagsBody)
async def tag_node(name: str, body: TagsBody, core: CoreDep) -> TagsBody:
    return TagsBody(tags=list(await nodes.tag_node(core, name, body.tags, ACTOR)))


class PeerRelayBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    on: bool


@router.post("/nodes/{name}/relay", response_model=PeerRelayBody)
async def peer_relay_node(name: str, body: PeerRelayBody, core: CoreDep) -> PeerRelayBody:
    """Turn a node's peer relay on or off (issue 14)."""
    return PeerRelayBody(on=await nodes.set_peer_relay(core, name, body.on, ACTOR))


class PendingPublic(BaseModel):
    """A machine waiting for `coordinator nodes approve CODE`."""

    code: str
    hostname: str  #: as asked for, made DNS-label-safe (an unauthenticated client chose it)
    node_public_key: str
    created_at: float
    expires_at: float


@router.get("/pending", response_model=list[PendingPublic])
async def list_pending(core: CoreDep) -> list[PendingPublic]:
    """Enrollments waiting for approval (not expired), oldest first."""
    return [
        PendingPublic(
            code=w.code,
            hostname=w.hostname,
            node_public_key=w.node_public_key,
            created_at=w.created_at,
            expires_at=w.expires_at,
        )
        for w in await approvals.list_pending(core)
    ]


@router.post("/approve", response_model=NodePublic)
async def approve(body: ApproveBody, core: CoreDep) -> NodePublic:
    e = await enrollment.approve(core, body.code, ACTOR)
    n = next(n for n in await nodes.list_nodes(core) if n.id == e.node_id)
    return NodePublic(
        id=n.id,
        name=n.name,
        user=n.user,
        ips=list(e.ips),
        wg_public_key=n.wg_public_key,
        node_public_key=n.node_public_key,
        tags=list(n.tags),
        created_at=n.created_at,
        expired=n.expired,
        online=n.online,
        endpoints=list(n.endpoints),
        cert_not_after=n.cert_not_after,
    )


@router.get("/policy", response_model=PolicyPublic)
async def get_policy(core: CoreDep) -> PolicyPublic:
    text = await nodes.get_policy(core)
    return PolicyPublic(policy=text, set=bool(text))


@router.put("/policy", response_model=PolicyPublic)
async def set_policy(body: PolicyBody, core: CoreDep) -> PolicyPublic:
    await nodes.set_policy(core, body.policy, ACTOR)
    return PolicyPublic(policy=body.policy, set=bool(body.policy))


@router.get("/audit", response_model=list[AuditPublic])
async def list_audit(
    core: CoreDep,
    since: Annotated[str | None, Query(max_length=64, description="RFC 3339: records from then on")] = None,
    after: Annotated[int, Query(ge=0, description="records with a larger id (paging)")] = 0,
    limit: Annotated[int | None, Query(ge=1, le=10_000, description="at most this many")] = None,
) -> list[AuditPublic]:
    """The trail, oldest first; without parameters all of it (`audit list --since T` pages with after)."""
    if since is not None:
        try:
            since = auditexport.iso_utc(since)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
    async with core.read() as s:
        entries = await audit.list_records(s, after=after, since=since, first=limit)
    return [
        AuditPublic(
            id=e.id,
            time=e.time,
            actor=e.actor,
            action=e.action,
            object=e.object,
            details=e.details,
            prev_hash=e.prev_hash,
            hash=e.hash,
        )
        for e in entries
    ]


@router.get("/audit/verify", response_model=AuditVerifyPublic)
async def verify_audit(core: CoreDep) -> AuditVerifyPublic:
    async with core.read() as s:
        r = await audit.verify(s)
    return AuditVerifyPublic(ok=r.ok, records=r.records, problem=r.problem)


class SigningRotateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    overlap: float | None = Field(default=None, ge=0, le=365 * 86400)


@router.post("/signing-key/rotate")
async def rotate_signing_key(body: SigningRotateBody, core: CoreDep) -> dict[str, object]:
    r = await rotation.rotate_signing_key(core, body.overlap, ACTOR)
    return {
        "key_id": r.key_id,
        "previous_key_id": r.previous_key_id,
        "trusted_until": r.trusted_until,
        "reissued": r.reissued,
    }


class RouteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prefix: str = Field(min_length=1, max_length=64)


@router.get("/routes")
async def list_routes(core: CoreDep) -> list[dict[str, object]]:
    """Advertised and approved routes of every node (issue 17)."""
    return [
        {
            "node": r.node,
            "node_id": r.node_id,
            "prefix": r.prefix,
            "advertised": r.advertised,
            "approved": r.approved,
            "primary": r.primary,
        }
        for r in await subnet_routes.list_routes(core)
    ]


@router.post("/nodes/{name}/routes/approve")
async def approve_route(name: str, body: RouteBody, core: CoreDep) -> dict[str, list[str]]:
    return {"approved": await subnet_routes.approve(core, name, body.prefix, ACTOR)}


@router.post("/nodes/{name}/routes/remove")
async def remove_route(name: str, body: RouteBody, core: CoreDep) -> dict[str, list[str]]:
    return {"removed": await subnet_routes.remove(core, name, body.prefix, ACTOR)}
