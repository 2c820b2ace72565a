"""Signed node endpoints: certificate renewal, long-poll map, and stream messages over plain HTTP."""

from __future__ import annotations

import json

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from coordinator import nodes, rotation
from coordinator import routes as subnet_routes
from coordinator.api.deps import CoreDep, NodeDep
from coordinator.api.schemas import CertPublic
from coordinator.api.stream import handle_client_message
from coordinator.errors import BadRequest, Forbidden
from meshd.proto import netmap, trust
from meshd.proto.encoding import b64encode

router = APIRouter(prefix="/api/v1", tags=["node"])


@router.post("/leave")
async def leave(node_id: NodeDep, core: CoreDep) -> dict[str, bool]:
    """`meshd down`: an ephemeral node is removed at once (issue 17); any other node is left as it is."""
    from coordinator import ephemeral  # it imports coordinator.nodes

    return {"removed": await ephemeral.leave(core, node_id)}


@router.post("/cert/renew", response_model=CertPublic)
async def renew(node_id: NodeDep, core: CoreDep) -> CertPublic:
    cert = await nodes.renew_cert(core, node_id)
    return CertPublic(cert=cert, trusted_keys=[b64encode(k) for k in core.keys.trusted])


class KeyRotate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    wg_public_key: str = Field(max_length=64)
    challenge: str = Field(max_length=64)
    box: str = Field(max_length=256)


@router.post("/keys/rotate", response_model=CertPublic)
async def rotate_key(body: KeyRotate, node_id: NodeDep, core: CoreDep) -> CertPublic:
    """Replace the node's WireGuard key (proof of possession: coordinator/rotation.py)."""
    cert = await rotation.rotate_wg_key(core, node_id, rotation.KeyRotation(**body.model_dump()))
    return CertPublic(cert=cert, trusted_keys=[b64encode(k) for k in core.keys.trusted])


@router.get("/signing-keys")
async def signing_keys(node_id: NodeDep, core: CoreDep) -> dict[str, object]:
    """The trusted signing keys, active first, with endorsements (meshd.proto.trust)."""
    return trust.encode(core.keys.announced())


@router.get("/map")
async def long_poll(
    node_id: NodeDep,
    core: CoreDep,
    since: int | None = Query(default=None, ge=0),
    wait: float = Query(default=0.0, ge=0, le=120),
    # required: a schema-valid request is a format-2 one (an older meshd sends none: 422 naming `proto`)
    proto: int = Query(
        ge=netmap.MAP_FORMAT, le=netmap.MAP_FORMAT, description="map format (netmap.MAP_FORMAT)"
    ),
) -> Response:
    """The full map (no `since`, or too old) or the delta since `since`, waiting up to `wait` seconds.

    The same signed messages as the stream (meshd.proto.netmap): signed for this node, checked by meshd."""
    state = core.state
    if since is not None and since >= state.version and wait > 0:
        await core.hub.wait_for_version(since, wait)
    if node_id not in state.peers:
        raise Forbidden("node removed or expired")
    pending = state.pending_since(since) if since is not None else None
    text = state.full_map_message(node_id) if pending is None else state.delta_message(pending, node_id)
    return Response(content=text, media_type="application/json")


@router.post("/messages", status_code=204)
async def post_message(node_id: NodeDep, core: CoreDep, request: Request) -> Response:
    """One node->server stream message (endpoints or signal) for nodes on the long-poll fallback."""
    try:
        msg = netmap.decode_client_message(await request.body())
    except netmap.NetmapError as exc:
        raise BadRequest(str(exc)) from None
    reply = await handle_client_message(core, node_id, msg)
    if reply is not None:
        raise BadRequest(json.loads(reply)["message"])
    return Response(status_code=204)


class RoutesAdvertise(BaseModel):
    model_config = ConfigDict(extra="forbid")
    routes: list[str] = Field(max_length=64)


@router.put("/routes")
async def advertise_routes(body: RoutesAdvertise, node_id: NodeDep, core: CoreDep) -> dict[str, list[str]]:
    """The prefixes this node offers to route (issue 17; replaces its earlier list); answers the approved."""
    approved = await subnet_routes.advertise(core, node_id, body.routes)
    return {"approved": list(approved)}
