"""The meshd daemon: enroll, hold the coordinator stream, keep WireGuard and the hosts block in step.

Life of ``meshd up`` (DESIGN.md §1):

1. Load or create the state dir (keys are made here and never leave the host). Enroll when not
   enrolled yet: with ``--auth-key``, or by printing a code for ``coordinator nodes approve``.
2. Bring up the WireGuard interface (backend ``auto|kernel|userspace``) with our overlay addresses,
   remove a block a crashed daemon left in the hosts file, start the local control socket.
3. Hold the map stream (WebSocket) with reconnect, backoff and jitter. On every full map or delta:
   verify every peer's certificate against the pinned coordinator keys, reconcile WireGuard by diff
   (unchanged peers keep their sessions), rewrite our hosts block. Report our endpoint candidates.
   While the coordinator is unreachable nothing is torn down: tunnels keep passing traffic.
4. Renew the node certificate at two thirds of its lifetime.
5. On SIGTERM/SIGINT or ``meshd down``: remove the interface and our hosts block, close the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import os
import random
import re
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from meshd import api, firewall, hosts, peerset, rotation, runtime, sdnotify
from meshd import status as st
from meshd.control import ControlClient, ControlError, Enrollment, NodeKeys, PendingApproval
from meshd.nat.engine import Traversal
from meshd.nat.mapper import PortMapShell
from meshd.proto import cert, netmap, trust
from meshd.proto.encoding import b64decode, b64encode
from meshd.proto.endpoint import Endpoint
from meshd.relay.manager import RelayManager
from meshd.state import NodeState, StateDir, StateError, StateLock
from meshd.wg.base import WireGuardBackend
from meshd.wg.errors import WgError
from meshd.wg.keys import b64_from_bytes
from meshd.wg.model import InterfaceConfig, InterfaceState
from meshd.wg.select import open_backend

log = logging.getLogger("meshd")

DEFAULT_LISTEN_PORT = 41641
RECONNECT_MIN = 0.5
RECONNECT_MAX = 30.0
HANDSHAKE_FRESH = 180.0  #: WireGuard REJECT_AFTER_TIME: an older handshake means no live session


class DaemonError(Exception):
    """A failure the user must act on; the message says what to do (printed as one line)."""


@dataclass(frozen=True, slots=True)
class Options:
    coordinator: str | None
    state_dir: Path
    interface: str = "mesh0"
    auth_key: str | None = field(default=None, repr=False)
    hostname: str | None = None
    wg_backend: str = "auto"
    listen_port: int = DEFAULT_LISTEN_PORT
    hosts_file: Path = hosts.DEFAULT_HOSTS_FILE
    approval_wait: float = 3600.0
    key_rotation: float = rotation.DEFAULT_INTERVAL  #: seconds between WireGuard key rotations; 0: never


def local_networks(exclude: str) -> dict[str, ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """Networks of this host's own interfaces (not loopback, not the mesh interface)."""
    from pyroute2 import IPRoute

    out: dict[str, ipaddress.IPv4Network | ipaddress.IPv6Network] = {}
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for msg in ipr.get_addr():
            name = names.get(msg["index"], "")
            addr = msg.get_attr("IFA_ADDRESS")
            if not addr or name in ("lo", exclude):
                continue
            ip = ipaddress.ip_address(addr)
            if ip.is_loopback or ip.is_link_local:
                continue
            out[f"{name}/{addr}"] = ipaddress.ip_network(f"{addr}/{msg['prefixlen']}", strict=False)
    return out


def endpoint_candidates(networks: dict[str, Any], port: int) -> list[str]:
    """Our LAN candidates: every local address with the WireGuard port (traversal adds more later)."""
    out = []
    for key in sorted(networks):
        addr = key.split("/", 1)[1]
        out.append(f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}")
    return out


def _ping_rtt(output: str) -> float | None:
    """The first ``time=1.23 ms`` of ping's output, in ms."""
    m = re.search(r"time[=<]([0-9.]+) ?ms", output)
    return float(m.group(1)) if m else None


class Daemon:
    """One running meshd. ``run()`` returns when stopped; DaemonError for problems the user must fix."""

    def __init__(self, opts: Options, *, clock: Callable[[], float] = time.time) -> None:
        self.opts = opts
        self.clock = clock
        self.store = StateDir(opts.state_dir)
        self.state: NodeState | None = None
        self.client: ControlClient | None = None
        self.backend: WireGuardBackend | None = None
        self.hosts = hosts.HostsFile(opts.hosts_file, tag=opts.interface)
        self.firewall = firewall.Firewall(opts.interface)  #: policy layer 2 (inbound rules from the map)
        self.map: netmap.NetMap | None = None
        self.verified: list[peerset.VerifiedPeer] = []
        self.connected = False
        self.stop_event = asyncio.Event()
        self.stop_reason = ""
        self._applied: InterfaceConfig | None = None
        self._apply_lock = asyncio.Lock()
        self._stream: Any = None
        self._candidates: list[str] = []
        self._networks: dict[str, Any] = {}
        self._port = opts.listen_port
        self._latency: dict[str, float] = {}
        self._api: api.ControlServer | None = None
        self._lock: StateLock | None = None
        self.traversal: Traversal | None = None
        self.relay: RelayManager | None = None
        self.portmap: PortMapShell | None = None
        self._resolved: dict[str, str] = {}
        self._rotate_lock = asyncio.Lock()
        self._issuers_asked: set[str] = set()

    # -- life cycle ----------------------------------------------------------------------------------------

    async def run(self, *, on_ready: Callable[[], None] | None = None) -> None:
        if os.geteuid() != 0:
            raise DaemonError("meshd up must run as root (it configures network interfaces); use sudo")
        try:
            self._lock = self.store.lock()  # one daemon per state dir, held until we exit
            self.state = self.store.load_or_create()
        except StateError as e:
            raise DaemonError(str(e)) from None
        url = self._coordinator_url()
        self.client = ControlClient(url, self.state.keys, self._node_id())
        try:
            if self.state.enrollment is None:
                await self._enroll(url)
            await self._bring_up()
            await self._start_traversal()
            self._api = api.ControlServer(self.store.socket_path, self._handlers())
            try:
                await self._api.start()
            except api.ApiError as e:
                raise DaemonError(str(e)) from None
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop, f"signal {sig.name}")
            tasks = [
                asyncio.create_task(self._stream_loop(), name="stream"),
                asyncio.create_task(self._renew_loop(), name="renew"),
                asyncio.create_task(self._watch_loop(), name="watch"),
            ]
            if self.opts.key_rotation > 0:
                tasks.append(asyncio.create_task(self._rotation_loop(), name="rotate"))
            sdnotify.notify("READY=1")
            log.info("meshd up: %s on %s (%s)", self._enrollment().name, self.opts.interface, self._kind())
            if on_ready is not None:
                on_ready()
            await self.stop_event.wait()
            sdnotify.notify("STOPPING=1")
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
        finally:
            await self._tear_down()
            await self.client.aclose()
            if self._lock is not None:
                self._lock.close()

    def stop(self, reason: str = "stop requested") -> None:
        if not self.stop_event.is_set():
            log.info("stopping: %s", reason)
            self.stop_reason = reason
            self.stop_event.set()

    def _coordinator_url(self) -> str:
        assert self.state is not None
        saved = self.state.coordinator_url
        url = self.opts.coordinator or saved
        if url is None:
            raise DaemonError("no coordinator: give --coordinator URL (e.g. http://coord.example:8080)")
        url = url.rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise DaemonError(f"coordinator URL {url!r} must start with http:// or https://")
        if saved and self.state.enrolled and saved.rstrip("/") != url:
            raise DaemonError(
                f"this node is enrolled with {saved}, not {url}; "
                f"use --state-dir for another mesh or move {self.store.state_file} away to re-enroll"
            )
        return url

    def _node_id(self) -> int | None:
        assert self.state is not None
        return self.state.enrollment.node_id if self.state.enrollment else None

    def _enrollment(self) -> Enrollment:
        assert self.state is not None and self.state.enrollment is not None
        return self.state.enrollment

    def _kind(self) -> str:
        return self.backend.kind if self.backend else "none"

    async def _enroll(self, url: str) -> None:
        assert self.state is not None and self.client is not None
        hostname = self.opts.hostname or os.uname().nodename.split(".")[0]
        try:
            result = await self.client.register(hostname, self.opts.auth_key)
            if isinstance(result, PendingApproval):
                print(
                    f"To add this machine to the mesh, run on the coordinator:\n"
                    f"    coordinator nodes approve {result.code}",
                    flush=True,
                )
                result = await self.client.wait_for_approval(result.code, within=self.opts.approval_wait)
        except ControlError as e:
            hint = ""
            if e.status in (401, 403):
                hint = "; ask the admin for a fresh key (coordinator keys create --user NAME)"
            elif e.status == 0:
                hint = "; check the URL and that `coordinator serve` runs there"
            raise DaemonError(f"enrollment failed: {e}{hint}") from None
        self.state = self.state.with_enrollment(url, result)
        self.store.save(self.state)
        log.info("enrolled as %s (%s)", result.name, ", ".join(result.ips))

    async def _bring_up(self) -> None:
        old = await runtime.clean_leftovers(self.opts.state_dir)
        if old is not None:
            log.info("removed leftovers of a meshd that did not stop cleanly (%s)", old.interface)
        try:
            self.backend = await open_backend(self.opts.wg_backend, self.opts.interface)
            await self.backend.create()
            await self._apply([])
            self._port = await self.backend.listen_port()
        except WgError as e:
            if self.backend is not None:
                with contextlib.suppress(Exception):
                    await self.backend.close()
            self.backend = None
            raise DaemonError(str(e)) from None
        runtime.write(
            self.opts.state_dir,
            runtime.Runtime(os.getpid(), self.opts.interface, str(self.opts.hosts_file), self._kind()),
        )
        try:
            self.hosts.update([])  # a crashed daemon's block goes; ours is rewritten with every map
        except hosts.HostsError as e:
            raise DaemonError(str(e)) from None

    def _start_relay(self) -> None:
        """The relay client (meshd.relay): per-peer 127.0.0.1 proxies are every new peer's first endpoint."""
        assert self.state is not None and self.client is not None
        self.relay = RelayManager(
            wg_key=self.state.keys.wg_public,
            wg_port=self._port,
            tickets=self.client.relay_ticket,
            on_state=lambda up: self.traversal.relay_changed(up) if self.traversal else None,
            ssl_context=self.client._ssl,
        )
        self.relay.start()

    def _relay_endpoint(self, wg_key: str) -> Endpoint | None:
        return self.relay.endpoint(wg_key) if self.relay is not None else None

    async def _start_traversal(self) -> None:
        assert self.state is not None and self.backend is not None
        self._start_relay()
        self.traversal = Traversal(
            backend=self.backend,
            node_seed=self.state.keys.node_private,
            port=self._port,
            stun_servers=(),
            send_signal=self._send_signal,
            relay_endpoint=self._relay_endpoint,
            own_key=lambda: b64encode(self.state.keys.wg_public) if self.state else "",
        )
        self.traversal.on_candidates = self._announce
        await self.traversal.start()
        if self.traversal.active:
            self.portmap = PortMapShell(
                self._port, f"{self._enrollment().name}/{self.opts.interface}", self.traversal.set_portmap
            )
            try:
                await self.portmap.start()
            except OSError as e:
                log.warning("no port maps: %s", e)

    async def _stun_servers(self, m: netmap.NetMap) -> list[Endpoint]:
        """Each relay region's STUN port and the one after it (two destinations: mapping variance)."""
        out: list[Endpoint] = []
        for region in m.relays:
            if not region.stun_port:
                continue
            host = urlsplit(region.url).hostname or ""
            ip = self._resolved.get(host)
            if ip is None:
                try:
                    infos = await asyncio.get_running_loop().getaddrinfo(host, None, family=socket.AF_INET)
                    ip = self._resolved[host] = str(infos[0][4][0])
                except (OSError, IndexError):
                    log.warning("cannot resolve relay region %s (%s)", region.name, host)
                    continue
            out += [(ip, region.stun_port), (ip, region.stun_port + 1)]
        return out

    async def _send_signal(self, node_id: int, payload: dict[str, Any]) -> None:
        if self._stream is not None:
            await self._stream.send_signal(node_id, payload)

    async def _announce(self, candidates: list[str]) -> None:
        self._candidates = candidates
        if self._stream is not None:
            with contextlib.suppress(Exception):
                await self._stream.send_endpoints(candidates)

    def _handlers(self) -> dict[str, api.Handler]:
        async def status(args: dict[str, Any]) -> Any:
            return (await self.status()).to_json()

        async def ping(args: dict[str, Any]) -> Any:
            peer = args.get("peer")
            if not isinstance(peer, str) or not peer:
                raise api.ApiError("ping needs a peer name")
            return await self.ping(peer)

        async def down(args: dict[str, Any]) -> Any:
            asyncio.get_running_loop().call_soon(self.stop, "meshd down")
            return {"stopping": True}

        async def netcheck(args: dict[str, Any]) -> Any:
            return await self.netcheck()

        async def rotate_keys(args: dict[str, Any]) -> Any:
            return await self.rotate_keys()

        return {
            "status": status,
            "ping": ping,
            "down": down,
            "netcheck": netcheck,
            "rotate-keys": rotate_keys,
        }

    async def rotate_keys(self) -> dict[str, Any]:
        """Replace our WireGuard key without dropping connections (meshd/rotation.py describes the order)."""
        assert self.state is not None and self.client is not None
        async with self._rotate_lock:
            old = b64encode(self.state.keys.wg_public)
            new = NodeKeys.generate().wg_private
            try:
                new_cert = await self.client.rotate_key(new)
                cert.verify(new_cert, self._enrollment().trusted_keys, self.clock())
            except (ControlError, cert.CertError) as e:
                raise api.ApiError(f"key rotation failed: {e}") from None
            self.state = self.state.with_wireguard_key(new).with_cert(new_cert)
            self.store.save(self.state)
            rotation.record_key_created(self.opts.state_dir, self.clock())
            self.client.keys = self.state.keys
            try:
                await self._apply(self.verified)
            except WgError as e:
                raise api.ApiError(f"new key registered but WireGuard refused it: {e}") from None
            if self.relay is not None:
                self.relay.rekey(self.state.keys.wg_public)
            new_pub = b64encode(self.state.keys.wg_public)
            log.info("wireguard key rotated: %s -> %s", old, new_pub)
            return {"old_public_key": old, "public_key": new_pub}

    async def _rotation_loop(self) -> None:
        """Rotate the WireGuard key every ``--key-rotation`` (retry every 60 s on failure)."""
        while True:
            due = rotation.key_created(self.opts.state_dir, self.clock()) + self.opts.key_rotation
            await asyncio.sleep(min(max(1.0, due - self.clock()), 3600.0))
            if self.clock() < due:
                continue
            try:
                await self.rotate_keys()
            except api.ApiError as e:
                log.warning("%s; retrying in 60 s", e)
                await asyncio.sleep(60)

    async def netcheck(self) -> dict[str, Any]:
        """What the network lets us do: UDP, public addresses, NAT mapping, port mapping, relay latency."""
        t = self.traversal
        if t is not None:
            await t.refresh_stun()
        spoken = self.portmap.spoken if self.portmap is not None else []
        if self.relay is not None:
            await self.relay.measure()
        regions = self.relay.status() if self.relay is not None else []
        return {
            "udp": bool(t is not None and t.nat.reflexive),
            "public_addresses": sorted({f"{ip}:{port}" for ip, port in t.nat.reflexive.values()})
            if t
            else [],
            "mapping_varies_by_dest": t.nat.mapping_varies_by_dest if t else None,
            "portmap": {
                "upnp": "upnp" in spoken,
                "natpmp": "natpmp" in spoken,
                "pcp": "pcp" in spoken,
                "active": t.nat.portmap if t else None,
                "mapped": f"{t.nat.portmapped[0]}:{t.nat.portmapped[1]}" if t and t.nat.portmapped else None,
            },
            "relays": [
                {
                    "id": r.id,
                    "name": r.name,
                    "latency_ms": r.rtt_ms,
                    "connected": r.connected,
                    "transport": r.transport,
                }
                for r in regions
            ],
            "preferred_relay": self.relay.home_name() if self.relay is not None else None,
        }

    async def _tear_down(self) -> None:
        if self.portmap is not None:
            await self.portmap.close()  # delete our port maps (meshd down, clean exit)
            self.portmap = None
        if self.traversal is not None:
            await self.traversal.close()
            self.traversal = None
        if self.relay is not None:
            await self.relay.close()
            self.relay = None
        if self._api is not None:
            await self._api.close()
            self._api = None
        if self.backend is not None:
            try:
                await self.backend.close()
            except Exception as e:  # tear-down goes on whatever broke
                log.warning("removing %s: %s", self.opts.interface, e)
            self.backend = None
        await self.firewall.close()
        with contextlib.suppress(hosts.HostsError):
            self.hosts.remove()
        runtime.clear(self.opts.state_dir)

    # -- reconcile -----------------------------------------------------------------------------------------

    def _endpoint_for(self, v: peerset.VerifiedPeer) -> Endpoint | None:
        if self.traversal is not None and self.traversal.active:
            return None  # the traversal engine sets endpoints once a probe was answered
        cands = peerset.parse_candidates(v.peer.endpoints)
        lan = peerset.first_reachable_candidate(cands, self._networks)
        return lan or self._relay_endpoint(v.peer.wg_public_key)  # no probes: LAN, else the relay

    def _has_path(self, v: peerset.VerifiedPeer) -> bool:
        return self.traversal is not None and self.traversal.keepalive_on(v.peer.wg_public_key)

    async def _apply(self, peers: list[peerset.VerifiedPeer]) -> None:
        assert self.state is not None and self.backend is not None
        e = self._enrollment()
        addresses = tuple(peerset.host_prefix(ip) for ip in e.ips)
        desired = InterfaceConfig(
            name=self.opts.interface,
            private_key=b64_from_bytes(self.state.keys.wg_private),
            listen_port=self.opts.listen_port,
            addresses=addresses,
            mtu=1280,
            peers=peerset.wg_peers(peers, self._endpoint_for, self._has_path),
        )
        async with self._apply_lock:
            ops = await self.backend.apply(desired)
            self._applied = desired
        if ops:
            log.info("wireguard: %d change(s)", len(ops))

    async def on_map(self, new: netmap.NetMap) -> None:
        """Verify, reconcile WireGuard, rewrite the hosts block."""
        assert self.state is not None
        self.map = new
        await self._learn_signing_keys(new)
        keys = list(self._enrollment().trusted_keys) or [self._enrollment().coordinator_public_key]
        good, bad = peerset.verify_peers(new, keys, self.clock())
        for r in bad:
            log.warning("not configuring peer %s (node %d): %s", r.name, r.node_id, r.reason)
        self.verified = good
        try:  # before peers are added: a newly visible peer never sees an open door
            await self.firewall.update(new.inbound)
        except firewall.FirewallError as e:
            log.error("firewall: %s", e)
        if self.relay is not None:
            self.relay.set_regions(new.relays)
            self.relay.set_peers((v.peer.wg_public_key, v.peer.relay_home) for v in good)
        await self._apply(good)
        if self.traversal is not None:
            self.traversal.set_stun_servers(await self._stun_servers(new))
            self.traversal.set_peers(
                (
                    v.name,
                    v.peer.node_id,
                    v.peer.wg_public_key,
                    b64decode(v.peer.node_public_key, length=32),
                    peerset.parse_candidates(v.peer.endpoints),
                )
                for v in good
            )
        try:
            self.hosts.update([hosts.HostEntry.for_peer(v.name, v.ips) for v in good])
        except hosts.HostsError as e:
            log.error("hosts file: %s", e)

    async def _learn_signing_keys(self, m: netmap.NetMap, force: bool = False) -> None:
        """Certificates from an issuer we do not trust yet mean the coordinator rotated its signing key:
        fetch the announced keys and keep those endorsed by a key we trust (meshd.proto.trust); also
        drops keys whose overlap ended. Then take our own re-issued certificate from the map."""
        assert self.state is not None and self.client is not None
        e = self._enrollment()
        known = {cert.key_id(k) for k in e.trusted_keys}
        issuers = set()
        for p in (*m.peers, m.self_node):
            with contextlib.suppress(cert.CertError):
                issuers.add(cert.decode(p.cert)[0].issuer)
        unknown = issuers - known
        if force or (unknown and not unknown <= self._issuers_asked):
            self._issuers_asked |= unknown
            try:
                accepted = trust.accept(e.trusted_keys, await self.client.signing_keys())
            except ControlError as err:
                log.warning("cannot fetch the coordinator's signing keys: %s", err)
                accepted = e.trusted_keys
            if accepted != e.trusted_keys:
                e = dataclasses.replace(e, trusted_keys=accepted)
                self.state = self.state.with_enrollment(self.state.coordinator_url or "", e)
                self.store.save(self.state)
                log.info("trusted coordinator signing keys: %s", ", ".join(cert.key_id(k) for k in accepted))
        mine = m.self_node.cert
        if mine != e.cert:
            try:
                newer = cert.verify(mine, e.trusted_keys, self.clock()).serial > cert.decode(e.cert)[0].serial
            except cert.CertError:
                return
            if not newer:
                return
            self.state = self.state.with_cert(mine)
            self.store.save(self.state)

    # -- tasks ---------------------------------------------------------------------------------------------

    async def _stream_loop(self) -> None:
        assert self.client is not None
        delay = RECONNECT_MIN
        while not self.stop_event.is_set():
            try:
                since = self.map.version if self.map else None
                async with self.client.stream(since=since) as stream:
                    stream.map = self.map
                    self._stream = stream
                    self.connected = True
                    delay = RECONNECT_MIN
                    log.info("coordinator stream connected (since=%s)", since)
                    await self._send_candidates(force=True)
                    while True:
                        msg = await stream.recv()
                        if isinstance(msg, netmap.MapMessage | netmap.DeltaMessage) and stream.map:
                            await self.on_map(stream.map)
                        elif isinstance(msg, netmap.SignalMessage) and self.traversal is not None:
                            self.traversal.on_signal(msg.peer, msg.payload)
                        elif isinstance(msg, netmap.ErrorMessage):
                            log.warning("coordinator: %s", msg.message)
            except ControlError as e:
                if e.status in (401, 403, 4401, 4403) and await self._revoked():
                    log.error("the coordinator no longer accepts this node: %s", e)
                    self.stop_reason = (
                        f"this node was removed or expired ({e}); re-enroll with --auth-key "
                        f"after moving {self.store.state_file} away"
                    )
                    await self._drop_peers()
                    self.stop_event.set()
                    return
                log.warning("%s; retrying in %.1f s", e, delay)
            except WgError as e:
                log.error("wireguard: %s", e)
            finally:
                self.connected = False
                self._stream = None
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(RECONNECT_MAX, delay * 2)

    async def _revoked(self) -> bool:
        """Confirm with a signed request that the coordinator refuses us (a closed stream alone may just
        be the coordinator restarting): True only on an explicit 401/403."""
        assert self.client is not None
        try:
            await self.client.fetch_map(since=self.map.version if self.map else None)
        except ControlError as e:
            return e.status in (401, 403)
        return False

    async def _drop_peers(self) -> None:
        with contextlib.suppress(Exception):
            await self._apply([])
        with contextlib.suppress(hosts.HostsError):
            self.hosts.update([])

    async def _send_candidates(self, force: bool = False) -> None:
        if self.traversal is not None:
            cands = self.traversal.candidates()
        else:
            cands = endpoint_candidates(self._networks, self._port)
        if (force or cands != self._candidates) and self._stream is not None:
            self._candidates = cands
            with contextlib.suppress(Exception):
                await self._stream.send_endpoints(cands)

    async def _watch_loop(self) -> None:
        """Every few seconds: notice new local addresses (roaming) and re-announce them."""
        while True:
            try:
                nets = await asyncio.to_thread(local_networks, self.opts.interface)
            except Exception as e:  # netlink trouble must not kill the daemon
                log.warning("reading local addresses: %s", e)
                nets = self._networks
            if nets != self._networks:
                self._networks = nets
                if self.traversal is not None:
                    self.traversal.set_local([k.split("/", 1)[1] for k in nets], nets.values())
                if self.map is not None:
                    await self.on_map(self.map)
            await self._send_candidates()
            await asyncio.sleep(5.0)

    async def _renew_loop(self) -> None:
        """Renew the node certificate at two thirds of its lifetime (retry every 30 s on failure)."""
        assert self.client is not None
        while True:
            payload = cert.decode(self._enrollment().cert)[0]
            renew_at = payload.not_before + (payload.not_after - payload.not_before) * 2 / 3
            await asyncio.sleep(max(1.0, renew_at - self.clock()))
            try:
                new = await self.client.renew_cert()
                cert.verify(new, self._enrollment().trusted_keys, self.clock())
            except (ControlError, cert.CertError) as e:
                log.warning("certificate renewal failed: %s; retrying in 30 s", e)
                await asyncio.sleep(30)
                continue
            assert self.state is not None
            self.state = self.state.with_cert(new)
            self.store.save(self.state)
            log.info("node certificate renewed")
            if self.map is not None:
                await self._learn_signing_keys(self.map, force=True)

    # -- status --------------------------------------------------------------------------------------------

    async def status(self) -> st.Status:
        """The ``meshd status`` document (DESIGN.md §2)."""
        e = self._enrollment()
        wg: InterfaceState | None = None
        if self.backend is not None:
            with contextlib.suppress(WgError):
                wg = await self.backend.state()
        now = self.clock()
        peers = []
        for v in self.verified:
            ps = wg.peer(v.peer.wg_public_key) if wg else None
            fresh = bool(ps and ps.last_handshake and now - ps.last_handshake < HANDSHAKE_FRESH)
            endpoint = ps.endpoint if ps else None
            hs = ps.last_handshake if ps and ps.last_handshake else None
            path = "direct" if fresh and endpoint else "none"
            latency = self._latency.get(v.name)
            tstat = self.traversal.status(v.peer.wg_public_key) if self.traversal else None
            if tstat is not None and self.traversal is not None and self.traversal.active:
                path = str(tstat.path)
                endpoint = tstat.endpoint
                if tstat.rtt is not None:
                    latency = round(tstat.rtt * 1000, 3)
            no_probes = self.traversal is None or not self.traversal.active
            if path != "direct" and self.relay is not None and no_probes:
                path = "relay" if self.relay.up else "none"
            peers.append(
                st.PeerStatus(
                    name=v.name,
                    ips=tuple(v.ips),
                    public_key=v.peer.wg_public_key,
                    path=path,
                    relay=self.relay.region_name(v.peer.relay_home) if self.relay is not None else None,
                    endpoint=f"{endpoint[0]}:{endpoint[1]}" if endpoint and path == "direct" else None,
                    latency_ms=latency,
                    last_handshake=datetime.fromtimestamp(hs, UTC) if hs else None,
                    rx_bytes=ps.rx_bytes if ps else 0,
                    tx_bytes=ps.tx_bytes if ps else 0,
                )
            )
        assert self.state is not None
        return st.Status(
            self_=st.SelfStatus(
                name=e.name,
                ips=tuple(e.ips),
                public_key=b64encode(self.state.keys.wg_public),
                interface=self.opts.interface,
                backend=self._kind(),
                endpoints=tuple(self._candidates),
                relay=self.relay.home_name() if self.relay is not None and self.relay.up else None,
                nat=st.NatStatus(
                    mapping_varies_by_dest=self.traversal.nat.mapping_varies_by_dest
                    if self.traversal
                    else None,
                    portmap=self.traversal.nat.portmap if self.traversal else None,
                ),
            ),
            coordinator=st.CoordinatorStatus(url=self.state.coordinator_url or "", connected=self.connected),
            peers=tuple(peers),
        )

    async def ping(self, name: str, count: int = 1) -> dict[str, Any]:
        """Ping ``name`` over the mesh (ICMP to its overlay address) and say which path answered."""
        v = self.peer_by_name(name)
        if v is None:
            known = ", ".join(sorted(p.name for p in self.verified)) or "none"
            raise api.ApiError(f"no peer named {name!r} (peers: {known})")
        ip = str(ipaddress.ip_interface(sorted(v.ips, key=lambda i: ":" in i)[0]).ip)
        proc = await asyncio.create_subprocess_exec(
            "ping",
            "-n",
            "-c",
            str(count),
            "-W",
            "2",
            "-I",
            self.opts.interface,
            ip,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
        rtt = _ping_rtt(out.decode(errors="replace"))
        status = await self.status()
        peer = next((p for p in status.peers if p.name == v.name), None)
        if rtt is None:
            return {"peer": v.name, "ip": ip, "answered": False, "path": peer.path if peer else "none"}
        self._latency[v.name] = round(rtt, 3)
        return {
            "peer": v.name,
            "ip": ip,
            "answered": True,
            "rtt_ms": rtt,
            "path": peer.path if peer else "none",
            "endpoint": peer.endpoint if peer else None,
        }

    def peer_by_name(self, name: str) -> peerset.VerifiedPeer | None:
        bare = name.removesuffix("." + self._enrollment().domain)
        for v in self.verified:
            if v.name == bare:
                return v
        return None
