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
            detail = _detail(response)
            raise AdminError(str(detail))
        return _answer(response)


def _answer(response: httpx.Response) -> Any:
    """A successful answer's JSON (None for an empty one)."""
    if response.status_code == 204 or not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        raise AdminError(
            f"the coordinator sent an answer this CLI cannot read (HTTP {response.status_code}); "
            "are the CLI and the server the same version?"
        ) from None


def _detail(response: httpx.Response) -> str:
    """The error's one line: the JSON ``detail`` the coordinator sends, else the body as it is."""
    try:
        return str(response.json().get("detail", response.text))
    except (ValueError, AttributeError):
        return response.text


def call(socket_path: Path, method: str, path: str, body: Any = None, *, timeout: float = 30.0) -> Any:
    """One admin call on a fresh connection: the decoded JSON answer, or AdminError saying what to do."""
    with AdminClient(socket_path, timeout=timeout) as client:
        return client.call(method, path, body)


API_PREFIX = "/api/v1"  #: where the node port serves the admin routes (coordinator/api/adminhttp.py)


class RemoteClient:
    """The same admin calls against a remote coordinator's node port, with a scoped bearer token.

    ``path`` is the admin.sock path (``/admin/nodes``); the token is sent only in the Authorization
    header and never appears in an error message."""

    def __init__(self, url: str, token: str, ca_cert: Path | None = None, timeout: float = 30.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise AdminError(f"coordinator URL {url!r} must start with https:// (or http:// in a lab)")
        self.url = url.rstrip("/")
        try:
            self._client = httpx.Client(
                base_url=self.url + API_PREFIX,
                headers={"Authorization": f"Bearer {token}"},
                verify=str(ca_cert) if ca_cert else True,
                timeout=timeout,
            )
        except (OSError, ValueError) as exc:
            raise AdminError(f"cannot use the CA certificate {ca_cert}: {exc}") from None

    def close(self) -> None:
        self._client.close()

    def call(self, method: str, path: str, json: Any = None) -> Any:
        try:
            response = self._client.request(method, path, json=json)
        except httpx.ConnectError as exc:
            if "CERTIFICATE_VERIFY_FAILED" in str(exc) or "SSL" in str(exc):
                raise AdminError(
                    f"the certificate of {self.url} is not trusted; pass --ca-cert with its CA (PEM)"
                ) from None
            raise AdminError(f"cannot connect to the coordinator at {self.url}") from None
        except httpx.TimeoutException:
            raise AdminError("the coordinator did not answer in time") from None
        except (httpx.TransportError, OSError) as exc:
            raise AdminError(f"lost the connection to the coordinator at {self.url}: {exc}") from None
        if response.status_code == 404 and "json" not in response.headers.get("content-type", ""):
            raise AdminError(f"{self.url} has no admin API at {API_PREFIX}{path}: is it a coordinator?")
        if response.status_code >= 400:
            detail = _detail(response)
            if response.status_code == 401:
                raise AdminError(
                    f"the coordinator refused the token: {detail}; create one with `tokens create`"
                )
            raise AdminError(str(detail))
        return _answer(response)


def read_token_file(path: Path) -> str:
    """The token in ``path`` (surrounding whitespace ignored), or AdminError saying what is wrong."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise AdminError(f"cannot read the token file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise AdminError(f"the token file {path} is not text") from None
    if not text.startswith("meshtok-") or any(c.isspace() for c in text) or len(text) > 100:
        raise AdminError(
            f"{path} does not hold an admin token (meshtok-...): see `coordinator tokens create`"
        )
    return text


def call_remote(
    url: str, token: str, method: str, path: str, body: Any = None, *, ca_cert: Path | None = None
) -> Any:
    """One admin call against a remote coordinator (``--url``): the decoded JSON answer, or AdminError."""
    client = RemoteClient(url, token, ca_cert)
    try:
        return client.call(method, path, body)
    finally:
        client.close()
