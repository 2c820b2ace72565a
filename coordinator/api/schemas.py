"""Request and response bodies (pydantic); strict types, unknown fields rejected."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ChallengePublic(BaseModel):
    challenge: str
    server_ephemeral_x25519_pub: str
    expires_at: float


class RegisterCreate(Strict):
    hostname: str = Field(min_length=1, max_length=255)
    wg_public_key: str = Field(max_length=64)
    node_public_key: str = Field(max_length=64)
    auth_key: str | None = Field(default=None, max_length=200)
    challenge: str = Field(max_length=64)
    signature: str = Field(max_length=128)
    box: str = Field(max_length=256)


class NetworkPublic(BaseModel):
    domain: str
    ipv4_prefix: str
    ipv6_prefix: str


class EnrolledPublic(BaseModel):
    status: str = "enrolled"
    node_id: int
    name: str
    ips: list[str]
    cert: str
    coordinator_public_key: str
    trusted_keys: list[str]
    network: NetworkPublic


class PendingPublic(BaseModel):
    status: str = "pending"
    code: str
    expires_at: float
    status_path: str


class CertPublic(BaseModel):
    cert: str
    trusted_keys: list[str]


class UserCreate(Strict):
    name: str = Field(min_length=1, max_length=64)


class UserPublic(BaseModel):
    id: int
    name: str
    created_at: float


class KeyCreate(Strict):
    user: str = Field(min_length=1, max_length=64)
    reusable: bool = False
    expiration: float = Field(default=3600.0, gt=0, le=10 * 365 * 86400)
    tags: list[str] = Field(default_factory=list, max_length=32)
    ephemeral: bool = False  #: nodes enrolled with it are removed when gone (coordinator/ephemeral.py)


class KeyPublic(BaseModel):
    key: str
    prefix: str
    user: str
    reusable: bool
    expires_at: float
    tags: list[str]
    ephemeral: bool = False


class NodePublic(BaseModel):
    id: int
    name: str
    user: str | None
    ips: list[str]
    wg_public_key: str
    node_public_key: str
    tags: list[str]
    created_at: float
    expired: bool
    online: bool
    endpoints: list[str]
    cert_not_after: int | None


class RenameBody(Strict):
    new_name: str = Field(min_length=1, max_length=63)


class TagsBody(Strict):
    tags: list[str] = Field(max_length=32)


class ApproveBody(Strict):
    code: str = Field(min_length=1, max_length=16)


class PolicyBody(Strict):
    policy: str = Field(max_length=1024 * 1024)


class PolicyPublic(BaseModel):
    policy: str
    set: bool


class AuditPublic(BaseModel):
    id: int
    time: str
    actor: str
    action: str
    object: str
    details: dict[str, Any]
    prev_hash: str
    hash: str


class AuditVerifyPublic(BaseModel):
    ok: bool
    records: int
    problem: str | None


class Message(BaseModel):
    detail: str
