"""Admin routes for scoped API tokens (on admin.sock, and remotely with an ``admin`` token)."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Path, Response
from pydantic import BaseModel, ConfigDict, Field

from coordinator import tokens
from coordinator.api.deps import CoreDep

router = APIRouter(prefix="/admin", tags=["tokens"])
ACTOR = "admin"


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scope: str = Field(max_length=16)
    expiration: float = Field(default=tokens.DEFAULT_LIFETIME, gt=0, le=tokens.MAX_LIFETIME)
    description: str = Field(default="", max_length=128)


class TokenCreated(BaseModel):
    id: int
    token: str
    prefix: str
    scope: str
    expires_at: float


class TokenPublic(BaseModel):
    id: int
    prefix: str
    scope: str
    description: str
    created_at: float
    expires_at: float
    revoked_at: float | None
    last_used_at: float | None
    state: str  #: active | expired | revoked


@router.post("/tokens", response_model=TokenCreated, status_code=201)
async def create_token(body: TokenCreate, core: CoreDep) -> TokenCreated:
    t = await tokens.create(core, body.scope, body.expiration, body.description, ACTOR)
    return TokenCreated(id=t.id, token=t.token, prefix=t.prefix, scope=t.scope, expires_at=t.expires_at)


@router.get("/tokens", response_model=list[TokenPublic])
async def list_tokens(core: CoreDep) -> list[TokenPublic]:
    now = time.time()
    return [TokenPublic(**asdict(t), state=t.state(now)) for t in await tokens.list_tokens(core)]


@router.delete("/tokens/{token_id}", status_code=204)
async def revoke_token(
    # a database integer: a larger id was a 500 (OverflowError in the driver), found by the admin-token fuzz
    token_id: Annotated[int, Path(ge=1, le=2**63 - 1)],
    core: CoreDep,
) -> Response:
    await tokens.revoke(core, token_id, ACTOR)
    return Response(status_code=204)
