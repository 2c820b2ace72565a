"""Enrollment endpoints: challenge, register, and status polling for interactive approval."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from coordinator import enrollment
from coordinator.api.auth import authenticate_key
from coordinator.api.deps import CoreDep
from coordinator.api.schemas import (
    ChallengePublic,
    EnrolledPublic,
    PendingPublic,
    RegisterCreate,
)
from coordinator.core import Core
from coordinator.nodes import Enrolled
from meshd.proto.encoding import b64encode

router = APIRouter(prefix="/api/v1/register", tags=["enrollment"])


def enrolled_body(core: Core, e: Enrolled) -> dict[str, Any]:
    """The enrolled answer (EnrolledPublic's fields) as plain JSON values."""
    return {
        "status": "enrolled",
        "node_id": e.node_id,
        "name": e.name,
        "ips": list(e.ips),
        "cert": e.cert,
        "coordinator_public_key": b64encode(core.keys.active_public),
        "trusted_keys": [b64encode(k) for k in core.keys.trusted],
        "network": {
            "domain": core.settings.domain,
            "ipv4_prefix": str(core.pool.v4),
            "ipv6_prefix": str(core.pool.v6),
        },
    }


def enrolled_public(core: Core, e: Enrolled) -> EnrolledPublic:
    return EnrolledPublic.model_validate(enrolled_body(core, e))


def pending_public(p: enrollment.Pending) -> PendingPublic:
    return PendingPublic(
        code=p.code, expires_at=p.expires_at, status_path=f"/api/v1/register/status/{p.code}"
    )


# The two enrollment routes answer with a JSONResponse of a plain dict: FastAPI then skips validating and
# serialising the answer through the response model again (which still documents it in /openapi.json);
# issue 16 measured the enrollment path's CPU per request.


@router.post("/challenge", response_model=ChallengePublic)
async def challenge(core: CoreDep) -> Response:
    c = await enrollment.issue_challenge(core)
    return JSONResponse(
        {
            "challenge": c.challenge,
            "server_ephemeral_x25519_pub": c.server_ephemeral_x25519_pub,
            "expires_at": c.expires_at,
        }
    )


@router.post("", response_model=EnrolledPublic | PendingPublic, responses={202: {"model": PendingPublic}})
async def register(body: RegisterCreate, request: Request, core: CoreDep) -> Response:
    source = request.client.host if request.client else "unknown"
    result = await enrollment.register(core, enrollment.Registration(**body.model_dump()), source)
    if isinstance(result, enrollment.Pending):
        return JSONResponse(pending_public(result).model_dump(mode="json"), status_code=202)
    return JSONResponse(enrolled_body(core, result))


@router.get(
    "/status/{code}", response_model=EnrolledPublic | PendingPublic, responses={202: {"model": PendingPublic}}
)
async def status(
    code: str, request: Request, core: CoreDep, response: Response
) -> EnrolledPublic | PendingPublic:
    """Signed by the waiting node's key (header x-mesh-node carries the code)."""
    key = await enrollment.pending_public_key(core, code)
    await authenticate_key(
        core, key, f"code:{code}", request.headers, request.method, request.url, await request.body()
    )
    result = await enrollment.status(core, code)
    if isinstance(result, enrollment.Pending):
        response.status_code = 202
        return pending_public(result)
    return enrolled_public(core, result)
