"""The one interface the daemon uses for WireGuard, whatever runs it (kernel or wireguard-go).

All methods are coroutines (the daemon is asyncio). Life cycle::

    backend = await open_backend("auto", "mesh0")   # meshd.wg.select
    await backend.create()                          # interface exists and is up
    await backend.apply(config)                     # reconcile by diff; returns what it did
    port = await backend.listen_port()              # the port actually bound (when 0 was asked)
    await backend.set_endpoint(peer_key, ("127.0.0.1", 40001))   # path switch, nothing else touched
    state = await backend.state()                   # peers with handshake, counters, endpoints
    await backend.close()                           # interface gone (and wireguard-go stopped)

Everything runs in the current network namespace. Errors are WgError subclasses (meshd.wg.errors).
"""

from __future__ import annotations

import abc
import logging
from typing import Protocol, runtime_checkable

from meshd.proto.endpoint import Endpoint
from meshd.wg import link
from meshd.wg.diff import AddPeer, DeviceOp, RemovePeer, UpdatePeer, desired_routes, plan_device
from meshd.wg.errors import WgConfigError
from meshd.wg.keys import canonical_key
from meshd.wg.model import InterfaceConfig, InterfaceState, PeerConfig, canonical_endpoint

log = logging.getLogger(__name__)


@runtime_checkable
class WireGuardBackend(Protocol):
    """A WireGuard interface the daemon can configure."""

    @property
    def name(self) -> str:
        """The interface name."""
        ...

    @property
    def kind(self) -> str:
        """ "kernel" or "userspace" (for `meshd status`)."""
        ...

    async def create(self) -> None:
        """Create the interface (adopting an existing one where the backend can) and bring it up."""
        ...

    async def apply(self, desired: InterfaceConfig) -> list[DeviceOp]:
        """Reconcile keys, port, fwmark, peers, addresses, MTU and per-peer routes to `desired`.

        Only what differs is changed; an unchanged peer keeps its session. Returns the WireGuard
        operations performed (empty when nothing changed).
        """
        ...

    async def state(self) -> InterfaceState:
        """What the interface is doing now."""
        ...

    async def set_endpoint(
        self, public_key: str, endpoint: Endpoint, persistent_keepalive: int | None = None
    ) -> None:
        """Point one existing peer at `endpoint` without touching anything else.

        With `persistent_keepalive`, set that too, after the endpoint: turning keepalive on makes WireGuard
        send at once, so a session is set up right away on the new path. (A peer added without an
        endpoint must not have keepalive on: WireGuard would try a handshake it cannot send and then wait
        REKEY_TIMEOUT, 5 s, before trying again.)
        """
        ...

    async def restart_handshake(self, public_key: str) -> None:
        """Remove one peer and add it back as it is (allowed IPs, endpoint, keepalive, preshared key).

        The new peer has no handshake state, so with keepalive on WireGuard initiates at once instead of
        after REKEY_TIMEOUT (5 s): the way out of a crossed first handshake (meshd.nat.endpoints).
        """
        ...

    async def listen_port(self) -> int:
        """The UDP port WireGuard is bound to."""
        ...

    def begin_close(self) -> None:
        """We are stopping: never restart whatever runs the interface from now on (synchronous)."""
        ...

    async def close(self) -> None:
        """Remove the interface (and stop whatever runs it). Safe to call twice."""
        ...


class ReconcilingBackend(abc.ABC):
    """Shared implementation: a backend provides device read/write; links and routes are common."""

    kind: str = ""

    def __init__(self, name: str) -> None:
        self._name = name
        self._desired: InterfaceConfig | None = None

    @property
    def name(self) -> str:
        return self._name

    @abc.abstractmethod
    async def _read(self) -> InterfaceState: ...

    @abc.abstractmethod
    async def _write(self, ops: list[DeviceOp]) -> None: ...

    def begin_close(self) -> None:  # noqa: B027 - a hook: only wireguard-go has something to stop
        """Nothing to stop restarting by default (the kernel runs the interface)."""

    async def state(self) -> InterfaceState:
        return await self._read()

    async def listen_port(self) -> int:
        return (await self._read()).listen_port

    async def apply(self, desired: InterfaceConfig) -> list[DeviceOp]:
        if desired.name != self._name:
            raise WgConfigError(f"config is for interface {desired.name}, this backend runs {self._name}")
        self._desired = desired
        ops = plan_device(desired, await self._read())
        if ops:
            log.info("%s: applying %d WireGuard change(s): %s", self._name, len(ops), ops)
            await self._write(ops)
        await link.sync_link(
            self._name,
            desired.addresses,
            desired.mtu,
            sorted(desired_routes(desired)),
            local=desired.local_addresses,
        )
        return ops

    async def set_endpoint(
        self, public_key: str, endpoint: Endpoint, persistent_keepalive: int | None = None
    ) -> None:
        key = canonical_key(public_key, "peer public key")
        state = await self._read()
        have = state.peer(key)
        if have is None:
            raise WgConfigError(f"peer {key} is not configured on {self._name}")
        keepalive = None if persistent_keepalive == have.persistent_keepalive else persistent_keepalive
        await self._write(
            [UpdatePeer(key, endpoint=canonical_endpoint(endpoint), persistent_keepalive=keepalive)]
        )

    async def restart_handshake(self, public_key: str) -> None:
        key = canonical_key(public_key, "peer public key")
        have = (await self._read()).peer(key)
        if have is None:
            raise WgConfigError(f"peer {key} is not configured on {self._name}")
        again = PeerConfig(
            key, have.allowed_ips, have.endpoint, have.persistent_keepalive, have.preshared_key
        )
        await self._write([RemovePeer(key), AddPeer(again)])
