"""The daemon's face on its local control socket: ``meshd status|ping|netcheck|down|rotate-keys``.

:mod:`meshd.api` serves the socket; this module answers the commands from the daemon's pieces. The
documents themselves are built by the pure functions of :mod:`meshd.status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
from typing import TYPE_CHECKING, Any

from meshd import api, localnet, why
from meshd import status as st
from meshd.credentials import CredentialError
from meshd.wg.errors import WgError

if TYPE_CHECKING:
    from meshd.daemon import Daemon
    from meshd.peerset import VerifiedPeer


class LocalCommands:
    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self._pinged: dict[str, float] = {}  #: peer name -> last `meshd ping` round trip, ms

    def handlers(self) -> dict[str, api.Handler]:
        async def status(args: dict[str, Any]) -> Any:
            return (await self.status()).to_json()

        async def ping(args: dict[str, Any]) -> Any:
            peer = args.get("peer")
            if not isinstance(peer, str) or not peer:
                raise api.ApiError("ping needs a peer name")
            return await self.ping(peer)

        async def down(args: dict[str, Any]) -> Any:
            asyncio.get_running_loop().call_soon(self.d.stop, "meshd down")
            return {"stopping": True}

        async def netcheck(args: dict[str, Any]) -> Any:
            return await self.netcheck()

        async def rotate_keys(args: dict[str, Any]) -> Any:
            assert self.d.creds is not None
            try:
                old, new = await self.d.creds.rotate_keys(self.d.opts.state_dir)
            except CredentialError as e:
                raise api.ApiError(str(e)) from None
            return {"old_public_key": old, "public_key": new}

        async def set_options(args: dict[str, Any]) -> Any:
            return await self.set_exit_node(args.get("exit_node"))

        return {
            "set": set_options,
            "status": status,
            "ping": ping,
            "down": down,
            "netcheck": netcheck,
            "rotate-keys": rotate_keys,
        }

    async def status(self) -> st.Status:
        """The ``meshd status`` document (docs/design.md, "status --json")."""
        assert self.d.creds is not None and self.d.applier is not None
        wg = None
        if self.d.backend is not None:
            with contextlib.suppress(WgError):
                wg = await self.d.backend.state()
        paths, relay = self.d.paths, self.d.relay
        peers = tuple(
            st.peer_status(
                name=v.name,
                ips=tuple(v.ips),
                public_key=v.peer.wg_public_key,
                decision=paths.path(v.peer.wg_public_key) if paths is not None else st.NO_PATH,
                wg=wg.peer(v.peer.wg_public_key) if wg is not None else None,
                relay=relay.relay_name(v.peer.wg_public_key, v.peer.relay_home)
                if relay is not None
                else None,
                pinged_ms=self._pinged.get(v.name),
                relay_transport=relay.transport(v.peer.wg_public_key) if relay is not None else None,
            )
            for v in self.d.applier.verified
        )
        # per peer, the approved prefixes it carries (issue 17)
        peers = tuple(
            dataclasses.replace(p, routes=v.peer.routes)
            for p, v in zip(peers, self.d.applier.verified, strict=True)
        )
        e = self.d.creds.enrollment
        # per relayed peer, why: our netcheck facts and the peer's from the map (issue 15)
        ours = self.own_facts(e.name)
        peers = tuple(
            dataclasses.replace(p, why=why.for_path(p.path, ours, self.peer_facts(v)))
            for p, v in zip(peers, self.d.applier.verified, strict=True)
        )
        nat = paths.nat if paths is not None else None
        return st.Status(
            self_=st.SelfStatus(
                name=e.name,
                ips=tuple(e.ips),
                public_key=self.d.creds.wg_public_b64,
                interface=self.d.opts.interface,
                backend=self.d.kind(),
                endpoints=tuple(paths.candidates()) if paths is not None else (),
                relay=relay.home_name() if relay is not None and relay.up else None,
                firewall_error=self.d.applier.firewall_error,
                dns=self.d.dns.address,
                routes_advertised=self.d.routes.advertised,
                routes_approved=self.d.routes.approved,
                exit_node=self.d.routes.exit_node,
                nat=st.NatStatus(
                    mapping_varies_by_dest=nat.mapping_varies_by_dest if nat else None,
                    portmap=nat.portmap if nat else None,
                ),
            ),
            coordinator=st.CoordinatorStatus(
                # the URL in use (of several: replicas, issue 16)
                url=self.d._client.url
                if self.d._client is not None
                else self.d.creds.state.coordinator_url or "",
                connected=self.d.session is not None and self.d.session.connected,
            ),
            peers=peers,
        )

    def own_facts(self, name: str) -> why.NetFacts:
        """This node's netcheck facts (what its path report tells the coordinator)."""
        from meshd.pathreport import facts_of  # here: meshd.pathreport imports this module

        f = facts_of(self.d.paths.nat if self.d.paths is not None else None, self.d.local_addresses)
        return why.side(name, f.udp, f.mapping, f.portmap) if f else why.NetFacts(name, None, None)

    @staticmethod
    def peer_facts(v: VerifiedPeer) -> why.NetFacts:
        """A peer's netcheck facts as the map carries them (``nat``; unknown until it reported)."""
        n = v.peer.nat
        return why.side(v.name, n.udp, n.mapping, n.portmap) if n else why.NetFacts(v.name, None, None)

    async def set_exit_node(self, name: Any) -> dict[str, Any]:
        """``meshd set --exit-node NAME|none``: switch at run time (issue 17; meshd/exitnode.py)."""
        assert self.d.applier is not None
        if name is not None and (not isinstance(name, str) or not name):
            raise api.ApiError("exit_node must be a peer name or null")
        if name is not None:
            exits = sorted(v.name for v in self.d.applier.verified if "0.0.0.0/0" in v.peer.routes)
            v = self.d.applier.peer_by_name(name)
            if v is None or v.name not in exits:
                raise api.ApiError(f"no exit node named {name!r} (exit nodes: {', '.join(exits) or 'none'})")
            name = v.name
        self.d.routes.exit_node = name
        await self.d.applier.reconcile()
        return {"exit_node": name}

    async def ping(self, name: str) -> dict[str, Any]:
        """Ping ``name`` over the mesh (ICMP to its overlay address) and say which path answered."""
        assert self.d.applier is not None
        v = self.d.applier.peer_by_name(name)
        if v is None:
            known = ", ".join(sorted(p.name for p in self.d.applier.verified)) or "none"
            raise api.ApiError(f"no peer named {name!r} (peers: {known})")
        ip = str(ipaddress.ip_interface(sorted(v.ips, key=lambda i: ":" in i)[0]).ip)
        rtt = await localnet.ping(self.d.opts.interface, ip)
        if rtt is not None:
            self._pinged[v.name] = round(rtt, 3)
        peer = next((p for p in (await self.status()).peers if p.name == v.name), None)
        out: dict[str, Any] = {"peer": v.name, "ip": ip, "answered": rtt is not None}
        if rtt is not None:
            out["rtt_ms"] = rtt
        out["path"] = peer.path if peer else "none"
        if rtt is not None:
            out["endpoint"] = peer.endpoint if peer else None
        # `meshd ping --explain` (issue 15): why relayed, and both sides' facts behind the verdict
        out["why"] = peer.why if peer else None
        assert self.d.creds is not None
        ours = self.own_facts(self.d.creds.enrollment.name)
        out["facts"] = {"self": why.summary(ours), "peer": why.summary(self.peer_facts(v))}
        return out

    async def netcheck(self) -> dict[str, Any]:
        """What the network lets us do: UDP, public addresses, NAT mapping, port mapping, relay latency."""
        if self.d.paths is not None:
            await self.d.paths.refresh_stun()
        if self.d.relay is not None:
            await self.d.relay.measure()
        return st.netcheck(
            self.d.paths.nat if self.d.paths is not None else st.NO_NAT,
            self.d.portmap.spoken if self.d.portmap is not None else [],
            self.d.relay.status() if self.d.relay is not None else [],
            self.d.relay.home_name() if self.d.relay is not None else None,
        )
