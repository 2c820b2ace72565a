"""The meshd daemon: wiring of the pieces, start-up, and a prompt, clean stop.

Life of ``meshd up`` (docs/design.md):

1. Load or create the state dir (keys are made here and never leave the host) and enroll if needed
   (meshd.credentials).
2. Bring up the WireGuard interface, remove what a crashed daemon left (meshd.runtime), start the relay
   client (meshd.relay) and the path strategy (meshd.nat.strategy: traversal, or LAN/relay only when no
   raw socket can be opened), ask the router for a port map, open the local control socket (meshd.api).
3. Supervised loops (meshd.supervise): the control session (meshd.session: map stream, candidates),
   certificate renewal and key rotation (meshd.credentials), the local address watch (meshd.localnet).
   Every map goes through meshd.mapapply; status and netcheck documents are built by meshd.status.
4. On SIGTERM/SIGINT, ``meshd down``, revocation, or a loop that keeps failing: cancel everything, then
   remove port maps, relay links, the interface, the firewall table and our hosts block, each step
   bounded in time so that meshd is gone within 5 s whatever the network or the coordinator does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshd import api, eventloop, firewall, hosts, localnet, pathreport, rotation, runtime, sdnotify
from meshd.control import ControlClient
from meshd.credentials import CredentialError, Credentials, default_hostname
from meshd.dns.service import DnsConfigError, MeshDns
from meshd.localcmd import LocalCommands
from meshd.mapapply import MapApplier
from meshd.nat.engine import Traversal
from meshd.nat.mapper import PortMapShell
from meshd.nat.strategy import PathStrategy, open_paths
from meshd.proto import peerrelay
from meshd.relay.manager import RelayManager
from meshd.relay.peerrelay import PeerRelayServer, public_address
from meshd.router import RouteService
from meshd.session import ControlSession
from meshd.state import StateDir, StateError, StateLock
from meshd.supervise import TaskGroup
from meshd.wg.base import WireGuardBackend
from meshd.wg.errors import WgError
from meshd.wg.select import open_backend

if TYPE_CHECKING:
    from meshd import metrics

log = logging.getLogger("meshd")

DEFAULT_LISTEN_PORT = 41641
GIVE_UP_AFTER = 20  #: a loop failing this many times in a row stops meshd (non-zero: systemd restarts it)
STOP_TASKS = 1.0  #: seconds for the loops to end after cancellation
STOP_PARTS = 2.0  #: ... for relay, paths, port maps and the control socket to close (concurrently)
STOP_INTERFACE = 1.5  #: ... for the WireGuard interface to go
SIGNAL_GRACE = 0.2  #: after a start-up failure, how long a SIGTERM sent with it may take to arrive
PENDING_KEY_WAIT = 5.0  #: at start, how long to ask the coordinator about an interrupted key rotation
LEAVE_WITHIN = 1.0  #: on `meshd down`, how long to wait for the coordinator to hear we leave


def coordinator_urls(text: str) -> tuple[str, ...]:
    """``--coordinator`` (or the saved URL): one URL or several, comma-separated, without trailing /."""
    cleaned = (u.strip().rstrip("/").strip() for u in text.split(","))  # "x /" is "x", "/" is nothing
    return tuple(dict.fromkeys(u for u in cleaned if u))


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
    dns: str = "auto"  #: --dns: auto | resolved | hosts | off (meshd/dns/system.py)
    advertise_routes: tuple[str, ...] = ()  #: prefixes offered to the mesh (meshd/router.py)
    advertise_exit_node: bool = False  #: offer 0.0.0.0/0 and ::/0
    snat_subnet_routes: bool = True  #: masquerade forwarded traffic (False: keep mesh source addresses)
    exit_node: str | None = None  #: route internet traffic through this peer (meshd/exitnode.py)
    metrics_listen: tuple[str, int] | None = None  #: (host, port) for Prometheus /metrics; None: off
    #: UDP ports served if the coordinator makes this node a peer relay (issue 14); None: never
    peer_relay_ports: range | None = None


async def _bounded(what: str, step: Awaitable[Any], within: float) -> None:
    """One tear-down step: whatever it raises or however long it takes, the tear-down goes on."""
    try:
        async with asyncio.timeout(within):
            await step
    except TimeoutError:
        log.warning("stopping: %s took longer than %.1f s; going on", what, within)
    except Exception as e:
        log.warning("stopping: %s: %s", what, e)


async def _cancel_leftovers(within: float = 0.5) -> None:
    """Cancel whatever task is still running (a handler of the control socket, a one-off send), bounded:
    asyncio.run() would otherwise cancel them itself and wait without a limit."""
    me = asyncio.current_task()
    rest = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
    for t in rest:
        t.cancel()
    if rest:
        _, pending = await asyncio.wait(rest, timeout=within)
        for t in pending:
            log.warning("stopping: task %s ignored its cancellation", t.get_name())


class Daemon:
    """One running meshd. ``run()`` returns when stopped; DaemonError for problems the user must fix."""

    def __init__(self, opts: Options, *, clock: Callable[[], float] = time.time) -> None:
        self.opts = opts
        self.clock = clock
        self.store = StateDir(opts.state_dir)
        self.stop_event = asyncio.Event()
        self.stop_reason = ""
        self.creds: Credentials | None = None
        self.backend: WireGuardBackend | None = None
        self.applier: MapApplier | None = None
        self.relay: RelayManager | None = None
        self.peer_relay: PeerRelayServer | None = None  #: serves when the coordinator says so (issue 14)
        self._signal_tasks: set[asyncio.Task[None]] = set()
        self.paths: PathStrategy | None = None
        #: our own addresses, "ifname/addr" (localnet.local_networks): a STUN answer naming one of them
        #: means a public address, no NAT (pathreport.facts_of, issue 15)
        self.local_addresses: frozenset[str] = frozenset()
        self.portmap: PortMapShell | None = None
        self.session: ControlSession | None = None
        self.hosts = hosts.HostsFile(opts.hosts_file, tag=opts.interface)
        self.firewall = firewall.Firewall(opts.interface)  #: policy layer 2 (inbound rules from the map)
        self.routes = RouteService(
            opts.interface,
            opts.advertise_routes,
            opts.advertise_exit_node,
            opts.snat_subnet_routes,
            opts.exit_node,
        )
        self.dns = MeshDns(opts.dns, opts.interface)  #: the resolver for mesh names (meshd/dns/)
        self.tasks = TaskGroup(on_fatal=self._fatal)
        self._failed: str | None = None
        self._api: api.ControlServer | None = None
        self._metrics: metrics.MetricsServer | None = None
        self._lock: StateLock | None = None
        self._client: ControlClient | None = None
        self._port = opts.listen_port

    # -- life cycle ----------------------------------------------------------------------------------------

    async def run(self, *, on_ready: Callable[[], None] | None = None) -> None:
        # the first line: Python start-up and imports are behind us (benchmarks/time_to_direct.py)
        log.info("starting (pid %d, %s loop)", os.getpid(), eventloop.running_name())
        if os.geteuid() != 0:
            raise DaemonError("meshd up must run as root (it configures network interfaces); use sudo")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # from the first moment: a stop during start-up cleans up
            loop.add_signal_handler(sig, self.stop, f"signal {sig.name}")
        main = asyncio.create_task(self._main(on_ready), name="meshd-main")
        stopped = asyncio.create_task(self.stop_event.wait(), name="meshd-stop")
        try:
            await asyncio.wait({main, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not main.done():
                main.cancel()
                await asyncio.wait({main})
            elif not self.stop_event.is_set():
                # A process-group SIGTERM reaches wireguard-go too: its death can fail start-up a moment
                # before the loop runs our signal handler. Let a pending signal arrive before calling
                # the failure the user's problem (exit 1) rather than part of the stop (exit 0).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(SIGNAL_GRACE):
                        await self.stop_event.wait()
            if self.stop_event.is_set():  # a start-up step cut short by the stop is part of the stop
                if not main.cancelled() and (err := main.exception()) is not None:
                    log.info("start-up interrupted by the stop: %s", err)
            else:
                main.result()  # DaemonError from start-up
        finally:
            stopped.cancel()
            sdnotify.notify("STOPPING=1")
            await self._tear_down()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await _cancel_leftovers()
            if self._lock is not None:
                self._lock.close()
        if self._failed is not None:
            raise DaemonError(self._failed)

    def stop(self, reason: str = "stop requested") -> None:
        if not self.stop_event.is_set():
            log.info("stopping: %s", reason)
            self.stop_reason = reason
            self.stop_event.set()
            if self.backend is not None:  # a process-group SIGTERM also hit wireguard-go: let it lie
                self.backend.begin_close()

    def _fatal(self, name: str, error: BaseException) -> None:
        self._failed = f"meshd stopped: its {name} loop kept failing ({error}); see the log"
        self.stop(self._failed)

    async def _main(self, on_ready: Callable[[], None] | None) -> None:
        creds = await self._credentials()
        self.creds = creds
        if creds.state.enrollment is None:
            hostname = self.opts.hostname or default_hostname()
            try:
                urls = ",".join(creds.client.urls)  # all of them are saved: the next start fails over too
                await creds.enroll(urls, hostname, self.opts.auth_key, self.opts.approval_wait)
            except CredentialError as e:
                raise DaemonError(str(e)) from None
        if creds.state.pending_wg_private is not None:  # a rotation was cut short: settle it first
            try:
                async with asyncio.timeout(PENDING_KEY_WAIT):
                    await creds.recover_pending_key()
            except (CredentialError, TimeoutError) as e:
                log.warning("%s; the first map will settle it", e or "no answer about the pending key")
        await self._bring_up(creds)
        await self._start_paths(creds)
        self._api = api.ControlServer(self.store.socket_path, LocalCommands(self).handlers())
        try:
            await self._api.start()
        except api.ApiError as e:
            raise DaemonError(str(e)) from None
        if self.opts.metrics_listen is not None:
            from meshd import metrics  # here: prometheus_client only when metrics are asked for

            self._metrics = metrics.MetricsServer(self, *self.opts.metrics_listen)
            try:
                await self._metrics.start()
            except OSError as e:
                where = "{}:{}".format(*self.opts.metrics_listen)
                raise DaemonError(f"cannot serve metrics on {where}: {e.strerror or e}") from None
        self._start_loops(creds)
        sdnotify.notify("READY=1")
        name = creds.enrollment.name
        log.info("meshd up: %s on %s (%s)", name, self.opts.interface, self.kind())
        if on_ready is not None:
            on_ready()
        await asyncio.Event().wait()  # until cancelled by run()

    async def _credentials(self) -> Credentials:
        try:
            self._lock = self.store.lock()  # one daemon per state dir, held until we exit
            state = self.store.load_or_create()
        except StateError as e:
            raise DaemonError(str(e)) from None
        saved = state.coordinator_url
        # several URLs, comma-separated: replicas of one coordinator, failed over between (issue 16)
        urls = coordinator_urls(self.opts.coordinator or saved or "")
        if not urls:
            raise DaemonError("no coordinator: give --coordinator URL (e.g. http://coord.example:8080)")
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise DaemonError(f"coordinator URL {url!r} must start with http:// or https://")
        if saved and state.enrolled and not set(coordinator_urls(saved)) & set(urls):
            raise DaemonError(
                f"this node is enrolled with {saved}, not {','.join(urls)}; "
                f"use --state-dir for another mesh or move {self.store.state_file} away to re-enroll"
            )
        node_id = state.enrollment.node_id if state.enrollment else None
        self._client = ControlClient(urls[0], state.keys, node_id, fallbacks=urls[1:])
        return Credentials(self.store, state, self._client, clock=self.clock)

    def kind(self) -> str:
        return self.backend.kind if self.backend else "none"

    async def _bring_up(self, creds: Credentials) -> None:
        old = await runtime.clean_leftovers(self.opts.state_dir)
        if old is not None:
            log.info("removed leftovers of a meshd that did not stop cleanly (%s)", old.interface)
        try:
            self.backend = await open_backend(self.opts.wg_backend, self.opts.interface)
            runtime.write(  # before the interface exists: the next start cleans up after a crash
                self.opts.state_dir,
                runtime.Runtime(os.getpid(), self.opts.interface, str(self.opts.hosts_file), self.kind()),
            )
            await self.backend.create()
            self.applier = MapApplier(
                interface=self.opts.interface,
                listen_port=self.opts.listen_port,
                creds=creds,
                backend=self.backend,
                fw=self.firewall,
                hosts_file=self.hosts,
                clock=self.clock,
            )
            self.dns.attach(self.applier, creds)
            self.applier.routes = self.routes
            await self.applier.reconcile([])
            self._port = await self.backend.listen_port()
            await self.dns.configure(self.applier)
        except (WgError, DnsConfigError) as e:
            raise DaemonError(str(e)) from None
        try:
            # a crashed daemon's block goes; ours is rewritten with every map, or never written at all when
            # names come from the resolver (--dns resolved/off): no empty markers in /etc/hosts then
            if self.applier.write_hosts:
                self.hosts.update([])
            else:
                self.hosts.remove()
        except hosts.HostsError as e:
            raise DaemonError(str(e)) from None

    async def _start_paths(self, creds: Credentials) -> None:
        """The relay client first (every new peer's first path), then the path strategy and port maps."""
        assert self.backend is not None and self.applier is not None and self._client is not None
        self.relay = RelayManager(
            wg_key=creds.keys.wg_public,
            wg_port=self._port,
            tickets=self._client.relay_ticket,
            on_state=lambda up: self.paths.relay_changed(up) if self.paths is not None else None,
            ssl_context=self._client.ssl_context,
        )
        self.relay.start()
        self.paths = await open_paths(
            backend=self.backend,
            node_seed=creds.keys.node_private,
            port=self._port,
            relay_endpoint=self.relay.endpoint,
            own_key=lambda: creds.wg_public_b64,
            on_candidates=self._announce,
            send_signal=self._send_signal,
            relay_up=self.relay.up,
        )
        if isinstance(self.paths, Traversal):  # UDP relay ports need the WireGuard port's raw socket
            self.paths.relay_ports(self.relay.use, self.relay.is_relay_address)
            self.relay.on_moved = self.paths.relay_moved
            if self.opts.peer_relay_ports is not None:  # a peer relay binds and forwards as root
                self.peer_relay = PeerRelayServer(
                    self.opts.peer_relay_ports, self._signal_soon, mesh_if=self.opts.interface
                )
        self.applier.relay, self.applier.paths = self.relay, self.paths
        if self.paths.probing:
            label = f"{creds.enrollment.name}/{self.opts.interface}"
            self.portmap = PortMapShell(self._port, label, self.paths.set_portmap)
            try:
                await self.portmap.start()
            except OSError as e:
                log.warning("no port maps: %s", e)

    def _start_loops(self, creds: Credentials) -> None:
        assert self.applier is not None and self._client is not None
        applier = self.applier
        self.session = ControlSession(
            self._client,
            on_map=applier.apply,
            on_signal=self._on_signal,
            on_revoked=self._revoked,
            candidates=lambda: self.paths.candidates() if self.paths else [],
            current_map=lambda: applier.map,
        )
        creds.on_rekey = self._rekey
        kw: dict[str, Any] = {"give_up_after": GIVE_UP_AFTER}
        self.tasks.start("stream", self.session.run, **kw)
        self.tasks.start("renew", lambda: creds.renew_loop(lambda: applier.map), **kw)
        self.tasks.start("watch", lambda: localnet.watch(self.opts.interface, self._local_changed), **kw)
        client = self._client
        self.routes.control_url = ",".join(client.urls)
        self.tasks.start("advertise", lambda: self.routes.advertise_loop(client), **kw)
        # no give-up: a coordinator that refuses path reports must not stop the mesh (issue 18)
        self.tasks.start("pathreport", lambda: pathreport.report_loop(self))
        if self.peer_relay is not None:
            self.tasks.start("peer-relay", self.peer_relay.run)
        if self.dns.enabled:  # no give-up: a resolver that cannot bind must not stop the mesh
            self.tasks.start("dns", self.dns.serve)
        if self.opts.key_rotation > 0:
            every = self.opts.key_rotation
            self.tasks.start("rotate", lambda: creds.rotation_loop(self.opts.state_dir, every), **kw)

    async def _tear_down(self) -> None:
        """Everything at once (the relay's reconnects stop first thing), then the interface and the rest."""
        if self.stop_reason == "meshd down" and self._client is not None and self.creds is not None:
            # an ephemeral node is removed at once (coordinator/ephemeral.py); others are left as they are
            await _bounded("telling the coordinator we leave", self._client.leave(), LEAVE_WITHIN)
        parts: list[Awaitable[Any]] = [self.tasks.stop(within=STOP_TASKS)]
        if self.relay is not None:
            parts.append(_bounded("relay links", self.relay.close(), STOP_PARTS))
        if self.peer_relay is not None:  # its sockets, nft table and conntrack entries (issue 14)
            try:
                self.peer_relay.close("meshd stopping")
            except Exception as e:  # the tear-down goes on
                log.warning("stopping: peer relay ports: %s", e)
        if self.paths is not None:
            parts.append(_bounded("path strategy", self.paths.close(), STOP_PARTS))
        if self.portmap is not None:
            parts.append(_bounded("deleting port maps", self.portmap.close(), STOP_PARTS))
        if self._api is not None:
            parts.append(_bounded("control socket", self._api.close(), STOP_PARTS))
        if self._metrics is not None:
            parts.append(_bounded("metrics listener", self._metrics.close(), STOP_PARTS))
        await asyncio.gather(*parts)
        self.portmap = self.paths = self.relay = self._api = self._metrics = None
        self.peer_relay = None
        await _bounded("systemd-resolved link settings", self.dns.close(), STOP_PARTS)
        last = [
            _bounded("firewall table", self.firewall.close(), STOP_INTERFACE),
            _bounded("forwarding", self.routes.close(), STOP_INTERFACE),
        ]
        if self.backend is not None:
            last.append(_bounded(f"removing {self.opts.interface}", self.backend.close(), STOP_INTERFACE))
        await asyncio.gather(*last)  # independent of each other
        self.backend = None
        with contextlib.suppress(hosts.HostsError):
            self.hosts.remove()
        runtime.clear(self.opts.state_dir)
        if self._client is not None:
            await _bounded("coordinator client", self._client.aclose(), 0.5)

    # -- events from the pieces ----------------------------------------------------------------------------

    async def _announce(self, candidates: list[str]) -> None:
        if self.session is not None:
            await self.session.announce(candidates)

    async def _send_signal(self, node_id: int, payload: dict[str, Any]) -> None:
        if self.session is not None:
            await self.session.send_signal(node_id, payload)

    def _signal_soon(self, node_id: int, payload: dict[str, Any]) -> None:
        """Send a signal from sync code (the peer relay's state messages)."""
        task = asyncio.get_running_loop().create_task(self._send_signal(node_id, payload))
        self._signal_tasks.add(task)
        task.add_done_callback(self._signal_tasks.discard)

    def _on_signal(self, node: int, payload: dict[str, Any]) -> None:
        """A signal on the map stream: peer relay messages (issue 14), else call-me-maybe."""
        kind = payload.get("type")
        if kind == peerrelay.TYPE:
            if node == 0:  # from the coordinator itself; verified before use
                task = asyncio.get_running_loop().create_task(self._peer_relay_signal(payload))
                self._signal_tasks.add(task)
                task.add_done_callback(self._signal_tasks.discard)
            return
        if kind == peerrelay.STATE_TYPE:
            if self.relay is not None:
                try:
                    peer, flags = peerrelay.decode_state(payload)
                except peerrelay.PeerRelayError as e:
                    log.warning("peer relay state from node %d ignored: %s", node, e)
                    return
                self.relay.udp.peer_state(node, peer, flags)
            return
        if self.paths is not None:
            self.paths.on_signal(node, payload)

    async def _peer_relay_signal(self, payload: dict[str, Any]) -> None:
        client = self._client
        if client is None or client.node_id is None or client.map_keys is None:
            return
        try:
            keys = await client.map_keys(peerrelay.signer(payload))
            body = peerrelay.decode(payload, client.node_id, keys, time.time())
        except Exception as e:  # a bad or forged offer costs nothing but this line
            log.warning("peer relay message refused: %s", e)
            return
        if isinstance(body, peerrelay.Serve | peerrelay.Stop):
            if self.peer_relay is not None:
                self.peer_relay.handle(body)
            else:
                log.info("the coordinator asks this node to be a peer relay, but it cannot serve")
        elif self.relay is not None:
            self.relay.peer_relay(body)

    def peer_relay_facts(self) -> tuple[str, int, int] | None:
        """(public address, low, high) when this node can be a peer relay (reported to the coordinator)."""
        if self.peer_relay is None or self.paths is None:
            return None
        addr = public_address(self.paths.nat.reflexive.values(), set(self.local_addresses))
        ports = self.peer_relay.ports
        return (addr, ports.start, ports.stop - 1) if addr is not None else None

    async def _local_changed(self, nets: dict[str, localnet.Network]) -> None:
        """Roaming: the path strategy hears of new addresses and WireGuard is re-diffed (no map re-apply)."""
        self.local_addresses = frozenset(key.partition("/")[2] for key in nets)
        if self.paths is not None:
            self.paths.set_local(nets)
        if self.applier is not None and self.applier.map is not None:
            await self.applier.reconcile()

    async def _revoked(self, why: str) -> None:
        if self.stop_event.is_set():  # stopping already: `meshd down` of an ephemeral node removes it
            return
        self.stop_reason = (
            f"this node was removed or expired ({why}); re-enroll with --auth-key "
            f"after moving {self.store.state_file} away"
        )
        if self.applier is not None:
            with contextlib.suppress(WgError):
                await self.applier.drop_peers()
        self.stop_event.set()

    async def _rekey(self) -> None:
        """Our WireGuard key changed (rotation): WireGuard and the relay links take it at once."""
        assert self.creds is not None
        if self.applier is not None:
            try:
                await self.applier.reconcile()
            except WgError as e:
                raise CredentialError(f"new key registered but WireGuard refused it: {e}") from None
        if self.relay is not None:
            self.relay.rekey(self.creds.keys.wg_public)
