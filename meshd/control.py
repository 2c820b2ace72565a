"""Node-side client of the coordinator's control plane (async; the one implementation of that protocol).

    keys = NodeKeys.generate()
    client = ControlClient("http://coordinator:8080", keys)
    result = await client.register("laptop", auth_key=key)      # Enrollment or PendingApproval
    async with client.stream() as stream:                        # full map, then deltas
        netmap = await stream.next_map()
        await stream.send_endpoints(["6.0.0.2:41641"])

Wire formats: meshd.proto.signing (request envelope), meshd.proto.cert, meshd.proto.netmap.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import httpx
from nacl.public import Box, PrivateKey, PublicKey
from nacl.signing import SigningKey

from meshd.proto import netmap, relay, signing, ticket, trust
from meshd.proto.encoding import b64decode, b64encode

if TYPE_CHECKING:  # websockets is imported when the map stream opens: not on `meshd up`'s start-up (issue 15)
    from websockets.asyncio.client import ClientConnection


class ControlError(Exception):
    """The coordinator refused or could not be reached; `status` is the HTTP status (0: no answer)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class MapRefused(ControlError):
    """A map or delta that does not verify (signature, recipient, version order): nothing of it is used.

    The stream is given up (the caller reconnects from its last good version)."""


#: Given the key id a map or delta names, the coordinator signing keys to verify it with (meshd:
#: ``Credentials.map_signing_keys``, which fetches newly endorsed keys once for an id it does not know).
MapKeys = Callable[[str], Awaitable[Sequence[bytes]]]


@dataclass(frozen=True, slots=True)
class NodeKeys:
    """The node's two private keys (kept on the host, 0600): WireGuard X25519 and node Ed25519 seed."""

    wg_private: bytes
    node_private: bytes

    @classmethod
    def generate(cls) -> NodeKeys:
        return cls(bytes(PrivateKey.generate()), os.urandom(32))

    @property
    def wg_public(self) -> bytes:
        return bytes(PrivateKey(self.wg_private).public_key)

    @property
    def node_public(self) -> bytes:
        return bytes(SigningKey(self.node_private).verify_key)


@dataclass(frozen=True, slots=True)
class Enrollment:
    node_id: int
    name: str
    ips: tuple[str, ...]
    cert: str
    coordinator_public_key: bytes  #: pin this
    trusted_keys: tuple[bytes, ...]
    domain: str
    ipv4_prefix: str
    ipv6_prefix: str


@dataclass(frozen=True, slots=True)
class PendingApproval:
    code: str  #: for `coordinator nodes approve CODE`
    expires_at: float


def _enrollment(data: dict[str, Any]) -> Enrollment:
    try:
        return Enrollment(
            node_id=int(data["node_id"]),
            name=str(data["name"]),
            ips=tuple(data["ips"]),
            cert=str(data["cert"]),
            coordinator_public_key=b64decode(data["coordinator_public_key"], length=32),
            trusted_keys=tuple(b64decode(k, length=32) for k in data["trusted_keys"]),
            domain=str(data["network"]["domain"]),
            ipv4_prefix=str(data["network"]["ipv4_prefix"]),
            ipv6_prefix=str(data["network"]["ipv6_prefix"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ControlError(f"malformed enrollment response: {exc}") from None


class ControlClient:
    """HTTP + WebSocket client for one node. `transport` lets tests use an in-process ASGI app."""

    def __init__(
        self,
        url: str,
        keys: NodeKeys,
        node_id: int | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 30.0,
        verify: bool | str | ssl.SSLContext = True,
        map_keys: MapKeys | None = None,
        fallbacks: tuple[str, ...] = (),
    ) -> None:
        """`verify`: True (system CAs), False, a CA bundle path, or an SSLContext. `map_keys`: where the
        keys that maps must be signed with come from; None takes maps unverified (tests and tools only:
        meshd's Credentials always sets it). `fallbacks`: more URLs of the same coordinator (replicas on
        one database), taken in turn by :meth:`fail_over`."""
        self.url = url.rstrip("/")
        #: every URL of the coordinator, the one in use first at start (issue 16: replicas)
        self.urls = tuple(dict.fromkeys((self.url, *(u.rstrip("/") for u in fallbacks))))
        self.keys = keys
        self.node_id = node_id
        self.map_keys = map_keys
        if isinstance(verify, str):
            verify = ssl.create_default_context(cafile=verify)
        self._ssl: ssl.SSLContext | None = verify if isinstance(verify, ssl.SSLContext) else None
        if verify is False:
            self._ssl = ssl.create_default_context()
            self._ssl.check_hostname = False
            self._ssl.verify_mode = ssl.CERT_NONE
        elif verify is True and not any(u.startswith("https:") for u in self.urls):
            # httpx loads the system CA bundle for every client (~18 ms of CPU at meshd's start, issue 15);
            # a plain-HTTP coordinator never uses it. Still verifying, with no CA: TLS here would fail closed.
            verify = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self._http = httpx.AsyncClient(base_url=self.url, transport=transport, timeout=timeout, verify=verify)

    def fail_over(self) -> bool:
        """Use the next of :attr:`urls` from now on (every later request and stream); False when there is
        only one."""
        if len(self.urls) < 2:
            return False
        self.url = self.urls[(self.urls.index(self.url) + 1) % len(self.urls)]
        self._http.base_url = httpx.URL(self.url)
        return True

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS settings of this client, for other connections to the same mesh (relay links)."""
        return self._ssl

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> ControlClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------------------------ plumbing
    async def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        signer: str | None = None,
        params: dict[str, Any] | None = None,
        request_timeout: float | None = None,
    ) -> httpx.Response:
        content = b"" if body is None else json.dumps(body).encode()
        headers = {"content-type": "application/json"} if body is not None else {}
        request = self._http.build_request(
            method,
            path,
            content=content,
            headers=headers,
            params=params,
            timeout=request_timeout if request_timeout is not None else httpx.USE_CLIENT_DEFAULT,
        )
        if signer is not None:
            target = request.url.raw_path.decode("ascii")
            request.headers.update(
                signing.sign_request(self.keys.node_private, signer, method, target, content, time.time())
            )
        try:
            response = await self._http.send(request)
        except httpx.HTTPError as exc:
            raise ControlError(f"cannot reach the coordinator at {self.url}: {exc}") from None
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise ControlError(f"coordinator said {response.status_code}: {detail}", response.status_code)
        return response

    def _need_id(self) -> str:
        if self.node_id is None:
            raise ControlError("not enrolled yet")
        return str(self.node_id)

    # ---------------------------------------------------------------------------------- enrollment
    async def register(self, hostname: str, auth_key: str | None = None) -> Enrollment | PendingApproval:
        """Prove possession of both keys and enroll (with a key) or get an approval code (without)."""
        ch = (await self._request("POST", "/api/v1/register/challenge")).json()
        challenge = b64decode(ch["challenge"], length=32)
        server_pub = b64decode(ch["server_ephemeral_x25519_pub"], length=32)
        box = Box(PrivateKey(self.keys.wg_private), PublicKey(server_pub)).encrypt(challenge)
        sig = signing.sign_enrollment(
            self.keys.node_private, challenge, self.keys.wg_public, self.keys.node_public, hostname
        )
        body = {
            "hostname": hostname,
            "wg_public_key": b64encode(self.keys.wg_public),
            "node_public_key": b64encode(self.keys.node_public),
            "auth_key": auth_key,
            "challenge": ch["challenge"],
            "signature": b64encode(sig),
            "box": b64encode(bytes(box)),
        }
        return self._registration_result(await self._request("POST", "/api/v1/register", body))

    def _registration_result(self, response: httpx.Response) -> Enrollment | PendingApproval:
        data = response.json()
        if response.status_code == 202:
            return PendingApproval(str(data["code"]), float(data["expires_at"]))
        enrollment = _enrollment(data)
        self.node_id = enrollment.node_id
        return enrollment

    async def enrollment_status(self, code: str) -> Enrollment | PendingApproval:
        response = await self._request("GET", f"/api/v1/register/status/{code}", signer=code)
        return self._registration_result(response)

    async def wait_for_approval(self, code: str, poll: float = 1.0, within: float = 3600.0) -> Enrollment:
        deadline = time.monotonic() + within
        while True:
            result = await self.enrollment_status(code)
            if isinstance(result, Enrollment):
                return result
            if time.monotonic() + poll > deadline:
                raise ControlError("gave up waiting for approval")
            await asyncio.sleep(poll)

    # --------------------------------------------------------------------------------- signed calls
    async def leave(self) -> bool:
        """Tell the coordinator we go down (``meshd down``); True when it removed us (ephemeral node)."""
        data = (await self._request("POST", "/api/v1/leave", signer=self._need_id())).json()
        return bool(data.get("removed"))

    async def renew_cert(self) -> str:
        data = (await self._request("POST", "/api/v1/cert/renew", signer=self._need_id())).json()
        return str(data["cert"])

    async def advertise_routes(self, routes: list[str]) -> list[str]:
        """Offer to route `routes` for the mesh (replaces the earlier offer); returns the approved ones."""
        body = {"routes": routes}
        data = (await self._request("PUT", "/api/v1/routes", body, signer=self._need_id())).json()
        return [str(r) for r in data.get("approved", [])]

    async def rotate_key(self, new_wg_private: bytes) -> str:
        """Register a new WireGuard key with proof of possession (a box of a fresh challenge made with
        the new private key); returns the re-issued certificate. The caller switches ``keys`` after."""
        ch = (await self._request("POST", "/api/v1/register/challenge")).json()
        challenge = b64decode(ch["challenge"], length=32)
        server_pub = b64decode(ch["server_ephemeral_x25519_pub"], length=32)
        box = Box(PrivateKey(new_wg_private), PublicKey(server_pub)).encrypt(challenge)
        body = {
            "wg_public_key": b64encode(bytes(PrivateKey(new_wg_private).public_key)),
            "challenge": ch["challenge"],
            "box": b64encode(bytes(box)),
        }
        data = (await self._request("POST", "/api/v1/keys/rotate", body, signer=self._need_id())).json()
        return str(data["cert"])

    async def signing_keys(self) -> tuple[trust.AnnouncedKey, ...]:
        """The coordinator's announced signing keys with endorsements (check with trust.accept)."""
        data = (await self._request("GET", "/api/v1/signing-keys", signer=self._need_id())).json()
        try:
            return trust.decode(data)
        except trust.TrustError as exc:
            raise ControlError(str(exc)) from None

    async def relay_ticket(self, region_id: int) -> ticket.Grant:
        """A short-lived relay ticket for one region (meshd.proto.ticket), its expiry (unix seconds), and
        a signer of the relay's challenge with our node key (a ticket alone opens no relay session)."""
        body = {"region_id": region_id}
        data = (await self._request("POST", relay.TICKET_PATH, body, signer=self._need_id())).json()
        node_key = SigningKey(self.keys.node_private)

        def sign(message: bytes) -> bytes:
            return node_key.sign(message).signature

        try:
            return ticket.Grant(str(data["ticket"]), float(data["not_after"]), sign)
        except (KeyError, TypeError, ValueError):
            raise ControlError("malformed relay ticket response from the coordinator") from None

    async def fetch_map(self, since: int | None = None, wait: float = 0.0) -> netmap.ServerMessage:
        """Long-poll fallback: the full map, or the delta since `since` (blocking up to `wait` s)."""
        params: dict[str, Any] = {"proto": netmap.MAP_FORMAT}
        if since is not None:
            params["since"] = since
        if wait:
            params["wait"] = wait
        response = await self._request(
            "GET", "/api/v1/map", signer=self._need_id(), params=params, request_timeout=wait + 30
        )
        try:
            msg = netmap.decode_server_message(response.content)
        except netmap.NetmapError as exc:
            raise ControlError(f"malformed map from the coordinator: {exc}") from None
        if isinstance(msg, netmap.MapMessage | netmap.DeltaMessage):
            await check_map(msg, self.node_id, self.map_keys)
            if isinstance(msg, netmap.DeltaMessage) and since is not None and msg.delta.from_version != since:
                raise MapRefused(f"map refused: delta from {msg.delta.from_version}, asked since {since}")
            if isinstance(msg, netmap.MapMessage) and since is not None and msg.map.version < since:
                raise MapRefused(f"map refused: map version {msg.map.version} is older than {since}")
        return msg

    async def post_message(self, message: netmap.ClientMessage) -> None:
        """Send an endpoints/signal message without a stream (long-poll fallback)."""
        await self._request(
            "POST",
            "/api/v1/messages",
            json.loads(netmap.encode_client_message(message)),
            signer=self._need_id(),
        )

    @asynccontextmanager
    async def stream(self, since: int | None = None) -> AsyncIterator[MapStream]:
        """Open the map WebSocket (signed handshake)."""
        path = f"/api/v1/stream?proto={netmap.MAP_FORMAT}" + (f"&since={since}" if since is not None else "")
        ws_url = "ws" + self.url[len("http") :] + path
        headers = signing.sign_request(self.keys.node_private, self._need_id(), "GET", path, b"", time.time())
        context = self._ssl if ws_url.startswith("wss") else None
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidStatus, WebSocketException

        try:
            ws = await connect(
                ws_url,
                additional_headers=headers,
                max_size=None,
                open_timeout=30,
                ssl=context,
                compression=None,
                close_timeout=1.0,  # a gone coordinator must not hold up a stop (default 10 s)
            )
        except InvalidStatus as exc:
            raise ControlError(
                f"stream refused: HTTP {exc.response.status_code}", exc.response.status_code
            ) from None
        except (OSError, WebSocketException, TimeoutError) as exc:
            raise ControlError(f"cannot open the map stream: {exc}") from None
        s = MapStream(ws, self.node_id, self.map_keys)
        try:
            yield s
        finally:
            await ws.close()


async def check_map(
    msg: netmap.MapMessage | netmap.DeltaMessage,
    node_id: int | None,
    map_keys: MapKeys | None,
    current: netmap.NetMap | None = None,
) -> None:
    """Raise MapRefused unless `msg` is signed for `node_id` by a key `map_keys` trusts (no-op without
    `map_keys`). An unknown key id goes to `map_keys` like any other: it decides whether to learn it.
    A delta shared by a view passes only against `current`, the map it would apply to."""
    if map_keys is None:
        return
    try:
        kid = netmap.signer(msg)
        if kid is None or node_id is None:
            raise netmap.NetmapError("not signed" if kid is None else "not enrolled")
        netmap.verify(msg, node_id, await map_keys(kid), current)
    except netmap.NetmapError as exc:
        raise MapRefused(f"map refused: {exc}") from None


class MapStream:
    """One open map stream. `recv()` returns the next server message and keeps `map` current.

    With `map_keys`, a map or delta is applied only once its signature verifies for `node_id`, and only
    in order (meshd.proto.netmap.check_order); otherwise `recv` raises MapRefused and `map` stays the
    last good one."""

    def __init__(self, ws: ClientConnection, node_id: int | None = None, map_keys: MapKeys | None = None):
        self.ws = ws
        self.node_id = node_id
        self.map_keys = map_keys
        self.map: netmap.NetMap | None = None

    async def recv(self, within: float | None = None) -> netmap.ServerMessage:
        """Next message; raises ControlError when the coordinator closed the stream (e.g. node removed)."""
        from websockets.exceptions import ConnectionClosed  # imported with the stream: a look-up

        try:
            async with asyncio.timeout(within):
                text = await self.ws.recv()
        except ConnectionClosed as exc:
            reason = exc.rcvd.reason if exc.rcvd else "connection lost"
            code = exc.rcvd.code if exc.rcvd else 0
            raise ControlError(f"map stream closed: {reason}", code) from None
        try:
            if isinstance(text, bytes):  # a long message, compressed (netmap.frame_server_message)
                text = netmap.inflate_frame(text)
            msg = netmap.decode_server_message(text)
        except netmap.NetmapError as exc:
            raise ControlError(f"malformed stream message: {exc}") from None
        if isinstance(msg, netmap.MapMessage | netmap.DeltaMessage):
            await check_map(msg, self.node_id, self.map_keys, self.map)
            if self.map is not None:
                try:
                    netmap.check_order(self.map, msg)
                except netmap.NetmapError as exc:
                    raise MapRefused(f"map refused: {exc}") from None
        if isinstance(msg, netmap.MapMessage):
            self.map = msg.map
        elif isinstance(msg, netmap.DeltaMessage) and self.map is not None:
            self.map = netmap.apply(self.map, msg.delta)
        return msg

    async def next_map(self, within: float | None = None) -> netmap.NetMap:
        """Receive until the map changes, then return it."""
        while True:
            msg = await self.recv(within)
            if isinstance(msg, netmap.MapMessage | netmap.DeltaMessage) and self.map is not None:
                return self.map

    @property
    def version(self) -> int | None:
        return self.map.version if self.map else None

    async def send_endpoints(self, candidates: list[str]) -> None:
        await self.ws.send(netmap.encode_client_message(netmap.EndpointsMessage(tuple(candidates))))

    async def send_signal(self, to: int, payload: dict[str, Any]) -> None:
        await self.ws.send(netmap.encode_client_message(netmap.SignalMessage(to, payload)))

    async def __aenter__(self) -> MapStream:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.ws.close()
