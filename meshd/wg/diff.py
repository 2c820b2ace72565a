"""Reconcile by diff: desired config vs actual state (plain values) -> the operations that close the gap.

Pure functions, no I/O. A backend executes the operations in order; a peer that did not change gets no
operation at all, so its session (handshake, counters, roamed endpoint) is left alone. That is the
DESIGN.md promise "reconciles the interface to the desired peer set by diffing, never by flushing".

Rules:
- device: the private key is compared through its public key; `listen_port` 0 means "any" and never
  moves a bound port; fwmark is compared as is.
- peers: absent from desired -> RemovePeer; absent from actual -> AddPeer; otherwise an UpdatePeer with
  only the fields that differ (None = leave alone). A desired endpoint of None never changes the current
  endpoint. Allowed IPs are compared as sets and, when different, replaced as a whole.
- routes: one route per allowed IP of every peer; default routes (``/0``) are never installed because
  they would capture the tunnel's own packets without policy routing (not implemented).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from meshd.proto.endpoint import Endpoint
from meshd.wg.keys import ZERO_KEY_B64, public_key
from meshd.wg.model import InterfaceConfig, InterfaceState, PeerConfig, PeerState


@dataclass(frozen=True, slots=True)
class SetDevice:
    """Change device-wide settings; a None field stays as it is."""

    private_key: str | None = None
    listen_port: int | None = None
    fwmark: int | None = None

    def __repr__(self) -> str:  # never print the private key
        key = "<changed>" if self.private_key is not None else None
        return f"SetDevice(private_key={key}, listen_port={self.listen_port}, fwmark={self.fwmark})"


@dataclass(frozen=True, slots=True)
class AddPeer:
    peer: PeerConfig


@dataclass(frozen=True, slots=True)
class UpdatePeer:
    """Change some fields of an existing peer (UAPI/netlink `update_only`); None = leave alone.

    `preshared_key` equal to the all-zero key removes the preshared key (WireGuard's convention).
    """

    public_key: str
    endpoint: Endpoint | None = None
    allowed_ips: tuple[str, ...] | None = None
    persistent_keepalive: int | None = None
    preshared_key: str | None = None

    def __repr__(self) -> str:
        psk = "<changed>" if self.preshared_key is not None else None
        return (
            f"UpdatePeer(public_key={self.public_key!r}, endpoint={self.endpoint!r}, "
            f"allowed_ips={self.allowed_ips!r}, persistent_keepalive={self.persistent_keepalive!r}, "
            f"preshared_key={psk})"
        )


@dataclass(frozen=True, slots=True)
class RemovePeer:
    public_key: str


DeviceOp = SetDevice | AddPeer | UpdatePeer | RemovePeer


def plan_device(desired: InterfaceConfig, actual: InterfaceState) -> list[DeviceOp]:
    """The WireGuard operations that turn `actual` into `desired`: removes, then updates, then adds."""
    ops: list[DeviceOp] = []
    want_pub = public_key(desired.private_key)
    dev = SetDevice(
        private_key=desired.private_key if actual.public_key != want_pub else None,
        listen_port=(
            desired.listen_port
            if desired.listen_port != 0 and desired.listen_port != actual.listen_port
            else None
        ),
        fwmark=desired.fwmark if desired.fwmark != actual.fwmark else None,
    )
    if dev != SetDevice():
        ops.append(dev)

    wanted = {p.public_key: p for p in desired.peers}
    have = {p.public_key: p for p in actual.peers}
    ops.extend(RemovePeer(k) for k in have if k not in wanted)
    for key, peer in wanted.items():
        if key in have:
            update = _peer_update(peer, have[key])
            if update is not None:
                ops.append(update)
    ops.extend(AddPeer(p) for k, p in wanted.items() if k not in have)
    return ops


def _peer_update(want: PeerConfig, have: PeerState) -> UpdatePeer | None:
    endpoint = want.endpoint if want.endpoint is not None and want.endpoint != have.endpoint else None
    allowed = want.allowed_ips if set(want.allowed_ips) != set(have.allowed_ips) else None
    keepalive = (
        want.persistent_keepalive if want.persistent_keepalive != have.persistent_keepalive else None
    )
    psk = (want.preshared_key or ZERO_KEY_B64) if want.preshared_key != have.preshared_key else None
    update = UpdatePeer(want.public_key, endpoint, allowed, keepalive, psk)
    return None if update == UpdatePeer(want.public_key) else update


def desired_routes(config: InterfaceConfig) -> set[str]:
    """Every peer allowed IP that gets a route via the interface (all but the default routes)."""
    return {net for p in config.peers for net in p.allowed_ips if ipaddress.ip_network(net).prefixlen > 0}


@dataclass(frozen=True, slots=True)
class SetPlan:
    """Items to add and to remove to turn one set into another (addresses, routes)."""

    add: tuple[str, ...]
    remove: tuple[str, ...]


def plan_set(desired: Iterable[str], actual: Iterable[str]) -> SetPlan:
    want, have = set(desired), set(actual)
    return SetPlan(add=tuple(sorted(want - have)), remove=tuple(sorted(have - want)))
