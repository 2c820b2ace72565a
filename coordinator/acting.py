"""On whose behalf an admin action runs: ``admin`` on admin.sock, ``token:ID`` through the node port.

The admin routes pass the actor ``admin`` to the services; a token-gated call (coordinator/api/adminhttp.py)
sets the token's id for the request, and :meth:`coordinator.core.Tx.audit` records ``token:ID`` instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_token: ContextVar[int | None] = ContextVar("acting_token", default=None)


def set_token(token_id: int) -> None:
    """For the rest of this request (its task and the tasks it starts), ``admin`` means this token."""
    _token.set(token_id)


def actor(given: str) -> str:
    token_id = _token.get()
    return f"token:{token_id}" if given == "admin" and token_id is not None else given


@contextmanager
def request_scope() -> Iterator[None]:
    """What a request sets here ends with it. A server runs each request in a task of its own anyway; an
    in-process ASGI client (the tests) runs them all in the caller's context, which Starlette's
    BaseHTTPMiddleware used to hide by running each request in a task (coordinator/app.py's Timing)."""
    reset = _token.set(_token.get())
    try:
        yield
    finally:
        _token.reset(reset)
