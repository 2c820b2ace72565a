"""Kernel backend: the in-kernel WireGuard driver over generic netlink (pyroute2 AsyncWireGuard).

Typed adapter: this is the only module that touches pyroute2 WireGuard messages; it returns the frozen
values of meshd.wg.model. The genl family is documented in the kernel's include/uapi/linux/wireguard.h.

pyroute2 pitfalls handled here: one peer per set call; an endpoint needs address and port; allowed IPs
always carry a prefix length and are replaced explicitly (WGPEER_F_REPLACE_ALLOWEDIPS); stale peers go only
when removed (WGPEER_F_REMOVE_ME); a large dump is split over several messages, and one peer's allowed IPs
may continue in the next message (merged here).
"""

from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING, Any

from meshd.netlink import netlink_call
from meshd.proto.endpoint import Endpoint
from meshd.wg import link
from meshd.wg.base import ReconcilingBackend
from meshd.wg.diff import AddPeer, DeviceOp, RemovePeer, SetDevice, UpdatePeer
from meshd.wg.errors import BackendUnavailable, InterfaceInUse, NetlinkFailure, WgError
from meshd.wg.keys import ZERO_KEY_B64
from meshd.wg.model import (
    InterfaceState,
    PeerState,
    canonical_endpoint,
    canonical_networks,
    check_ifname,
)

if TYPE_CHECKING:  # pyroute2 is imported by the calls, not with meshd (meshd.wg.link, issue 15)
    from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger(__name__)


class KernelBackend(ReconcilingBackend):
    """WireGuard in the Linux kernel (wireguard.ko), configured through netlink."""

    kind = "kernel"

    def __init__(self, name: str) -> None:
        super().__init__(check_ifname(name))

    async def create(self) -> None:
        """Create the wireguard link (an existing wireguard link of this name is adopted) and set it up."""
        kind = await link.link_kind(self._name)
        if kind is None:
            await link.create_wireguard_link(self._name)
        elif kind != "wireguard":
            raise InterfaceInUse(
                f"interface {self._name} exists and is not a wireguard link ({kind or 'unknown kind'}); "
                "choose another --interface"
            )
        await link.set_up(self._name)

    async def close(self) -> None:
        await link.delete_link(self._name)

    @netlink_call
    async def _read(self) -> InterfaceState:
        from pyroute2.netlink.exceptions import NetlinkError
        from pyroute2.netlink.generic.wireguard import AsyncWireGuard

        try:
            async with AsyncWireGuard() as wg:
                await wg.setup_endpoint()  # binds the "wireguard" genl family (ENOENT: no module)
                msgs: list[Any] = [m async for m in await wg.info(self._name)]
        except NetlinkError as e:
            raise _failure(f"reading {self._name}", e) from None
        return _decode_device(self._name, msgs)

    @netlink_call
    async def _write(self, ops: list[DeviceOp]) -> None:
        from pyroute2.netlink.exceptions import NetlinkError
        from pyroute2.netlink.generic.wireguard import AsyncWireGuard

        try:
            async with AsyncWireGuard() as wg:
                await wg.setup_endpoint()
                for op in ops:
                    if isinstance(op, SetDevice):
                        await wg.set(
                            self._name,
                            listen_port=op.listen_port,
                            fwmark=op.fwmark,
                            private_key=op.private_key,
                        )
                    else:
                        await wg.set(self._name, peer=_peer_request(op))
        except NetlinkError as e:
            raise _failure(f"configuring {self._name}", e) from None


def _failure(what: str, e: NetlinkError) -> WgError:
    if e.code == errno.ENOENT:
        return BackendUnavailable(f"{what}: the kernel has no wireguard netlink family (modprobe wireguard)")
    if e.code == errno.ENODEV:
        return NetlinkFailure(f"{what}: no such wireguard interface")
    return NetlinkFailure(f"{what}: {e.args[1] if len(e.args) > 1 else e}")


def _peer_request(op: AddPeer | UpdatePeer | RemovePeer) -> dict[str, Any]:
    """One pyroute2 peer dict for one operation (pyroute2 sets one peer per call)."""
    if isinstance(op, RemovePeer):
        return {"public_key": op.public_key, "remove": True}
    if isinstance(op, AddPeer):
        p = op.peer
        req: dict[str, Any] = {
            "public_key": p.public_key,
            "preshared_key": p.preshared_key or ZERO_KEY_B64,
            "persistent_keepalive": p.persistent_keepalive,
            "replace_allowed_ips": True,
            "allowed_ips": list(p.allowed_ips),
        }
        if p.endpoint is not None:
            req["endpoint_addr"], req["endpoint_port"] = p.endpoint
        return req
    req = {"public_key": op.public_key, "update_only": True}
    if op.preshared_key is not None:
        req["preshared_key"] = op.preshared_key
    if op.persistent_keepalive is not None:
        req["persistent_keepalive"] = op.persistent_keepalive
    if op.endpoint is not None:
        req["endpoint_addr"], req["endpoint_port"] = op.endpoint
    if op.allowed_ips is not None:
        req["replace_allowed_ips"] = True
        req["allowed_ips"] = list(op.allowed_ips)
    return req


def _key(nla: Any) -> str | None:
    """A key attribute: pyroute2 gives either the base64 bytes or the nla holding them in 'value'."""
    if nla is None:
        return None
    value = nla if isinstance(nla, bytes | str) else nla["value"]
    text = value.decode() if isinstance(value, bytes) else str(value)
    return None if text == ZERO_KEY_B64 else text


def _decode_device(name: str, msgs: list[Any]) -> InterfaceState:
    if not msgs:
        raise NetlinkFailure(f"reading {name}: the kernel returned nothing")
    first = msgs[0]
    peers: list[dict[str, Any]] = []
    for msg in msgs:
        for peer in msg.get_attr("WGDEVICE_A_PEERS") or ():
            key = _key(peer.get_attr("WGPEER_A_PUBLIC_KEY"))
            allowed = [a["addr"] for a in (peer.get_attr("WGPEER_A_ALLOWEDIPS") or ()) if "addr" in a]
            if peers and peers[-1]["public_key"] == key:
                peers[-1]["allowed"] += allowed  # continuation of the same peer in the next message
                continue
            ep = peer.get_attr("WGPEER_A_ENDPOINT")
            endpoint: Endpoint | None = None
            if ep is not None and ep.get("port"):
                endpoint = canonical_endpoint((str(ep["addr"]), int(ep["port"])))
            hs = peer.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")
            sec, nsec = (int(hs["tv_sec"]), int(hs["tv_nsec"])) if hs is not None else (0, 0)
            peers.append(
                {
                    "public_key": key,
                    "preshared_key": _key(peer.get_attr("WGPEER_A_PRESHARED_KEY")),
                    "endpoint": endpoint,
                    "allowed": allowed,
                    "handshake": None if sec == 0 and nsec == 0 else sec + nsec / 1e9,
                    "rx": int(peer.get_attr("WGPEER_A_RX_BYTES") or 0),
                    "tx": int(peer.get_attr("WGPEER_A_TX_BYTES") or 0),
                    "keepalive": int(peer.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") or 0),
                }
            )
    return InterfaceState(
        name=name,
        public_key=_key(first.get_attr("WGDEVICE_A_PUBLIC_KEY")),
        listen_port=int(first.get_attr("WGDEVICE_A_LISTEN_PORT") or 0),
        fwmark=int(first.get_attr("WGDEVICE_A_FWMARK") or 0),
        peers=tuple(
            PeerState(
                public_key=str(p["public_key"]),
                endpoint=p["endpoint"],
                allowed_ips=canonical_networks(p["allowed"]),
                last_handshake=p["handshake"],
                rx_bytes=p["rx"],
                tx_bytes=p["tx"],
                persistent_keepalive=p["keepalive"],
                preshared_key=p["preshared_key"],
            )
            for p in peers
        ),
    )
