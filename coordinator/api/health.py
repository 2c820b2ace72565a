"""Liveness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from coordinator.api.deps import CoreDep

router = APIRouter(tags=["health"])
#: apart from `router` so that the public app can leave it out when `metrics_listen` is set
metrics_router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz(core: CoreDep) -> dict[str, object]:
    return {
        "status": "ok",
        "map_version": core.state.version,
        "nodes": len(core.state.peers),
        "connected": core.hub.connected,
    }


@metrics_router.get("/metrics")
async def metrics(core: CoreDep) -> Response:
    return Response(generate_latest(core.metrics.registry), media_type=CONTENT_TYPE_LATEST)
