"""Shared FastAPI dependencies."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from coordinator.api.auth import authenticate_node
from coordinator.core import Core


async def get_core(request: Request) -> Core:
    # async: FastAPI runs a plain `def` dependency in a worker thread, a thread hand-off per request
    core: Core = request.app.state.core
    return core


CoreDep = Annotated[Core, Depends(get_core)]


async def signed_node(request: Request) -> int:
    core: Core = request.app.state.core
    body = await request.body()
    return await authenticate_node(core, request.headers, request.method, request.url, body)


NodeDep = Annotated[int, Depends(signed_node)]
