"""The admin CLI's client: JSON over HTTP on `<state-dir>/admin.sock`.

The counterpart of ``meshd.api.call`` for the coordinator: every failure is an :class:`AdminError` whose
message is the one line the CLI prints (``error: <message>``), never a traceback.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any

import httpx


class AdminError(Exception):
    """A failed admin call, with a one-line message for the user."""


class AdminClient:
    def __init__(self, socket_path: Path, timeout: float = 30.0) -> None:
        self.socket_path = socket_path
        self._client = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(socket_path)),
            base_url="http://coordinator",
            timeout=timeout,
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def call(self, method: str, path: str, json: Any = None) -> Any:
        if not self.socket_path.exists():
            raise AdminError(
                f"coordinator is not running (no {self.socket_path}); start it with "
                "`coordinator serve` or pass the right --state-dir"
            )
        try:
            response = self._client.request(method, path, json=json)
        except (httpx.ConnectError, httpx.RemoteProtocolError, FileNotFoundError, ConnectionRefusedError):
            raise AdminError(f"coordinator is not running (cannot connect to {self.socket_path})") from None
        except PermissionError:
            raise AdminError(
                f"permission denied on {self.socket_path}: run as the coordinator's user"
            ) from None
        except httpx.TimeoutException:
            raise AdminError("the coordinator did not answer in time") from None
        except (httpx.TransportError, OSError) as exc:
            raise AdminError(f"lost the connection to the coordinator at {self.socket_path}: {exc}") from None
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except (ValueError, AttributeError):
                detail = response.text
            raise AdminError(str(detail))
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise AdminError(
                f"the coordinator sent an answer this CLI cannot read (HTTP {response.status_code}); "
                "are the CLI and the server the same version?"
            ) from None


def call(socket_path: Path, method: str, path: str, body: Any = None, *, timeout: float = 30.0) -> Any:
    """One admin call on a fresh connection: the decoded JSON answer, or AdminError saying what to do."""
    with AdminClient(socket_path, timeout=timeout) as client:
        return client.call(method, path, body)
