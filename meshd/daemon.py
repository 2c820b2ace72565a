"""The meshd daemon: wiring of the pieces, start-up, and a prompt, clean stop.

Life of ``meshd up`` (docs/design.md):

1. Load or create the state dir (keys are made here and never leave the host) and enroll if needed
   (meshd.enrollment; the options and DaemonError: meshd.options). Meanwhile, what a crashed daemon left
   is removed (meshd.runtime) and the WireGuard interface is created (wireguard-go started).
2. Right after enrollment the control session (meshd.session: map stream, candidates) opens; its maps
   wait until step 3 is done. Configure the interface, start the relay client (meshd.relay) and the path
   strategy (meshd.nat.strategy: traversal, or LAN/relay only when no raw socket can be opened), ask the
   router for a port map, open the local control socket (meshd.api).
3. Supervised loops (meshd.supervise): certificate renewal and key rotation (meshd.credentials), the
   local address watch (meshd.localnet), and the optional services (meshd.services: metrics, DNS,
   advertised routes, path reports, peer relay; its signals: meshd.relay.peersignals). Every map goes
   through meshd.mapapply; status and netcheck documents are built by meshd.status.
4. On SIGTERM/SIGINT, ``meshd down``, revocation, or a loop that keeps failing: cancel everything, then
   remove port maps, relay links, the interface, the firewall table and our hosts block, each step
   bounded in time so that meshd is gone within 5 s whatever the network or the coordinator does
   (meshd.teardown).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from meshd import api, enrollment, eventloop, firewall, hosts, localnet, runtime, sdnotify, services, teardown
from meshd.control import ControlClient
from meshd.credentials import CredentialError, Credentials
from meshd.dns.service import DnsConfigError, MeshDns
from meshd.localcmd import LocalCommands
from meshd.mapapply import MapApplier
from meshd.nat.mapper import PortMapShell
from meshd.nat.strategy import PathStrategy, open_paths
from meshd.options import DaemonError, Options
from meshd.proto import netmap
from meshd.relay.manager import RelayManager
from meshd.relay.peersignals import PeerRelaySignals
from meshd.router import RouteService
from meshd.session import ControlSession
from meshd.startup import GC_AFTER_UP, GC_PAUSE_MAX, resume_gc
from meshd.state import StateDir, StateError, StateLock
from meshd.supervise import TaskGroup
from meshd.wg.base import WireGuardBackend
from meshd.wg.errors import WgError
from meshd.wg.select import open_backend

if TYPE_CHECKING:
    from meshd import metrics

__all__ = ["Daemon", "DaemonError", "Options"]

log = logging.getLogger("meshd")

GIVE_UP_AFTER = 20  #: a loop failing this many times in a row stops meshd (non-zero: systemd restarts it)
SIGNAL_GRACE = 0.2  #: after a start-up failure, how long a SIGTERM sent with it may take to arrive


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
        self.signals: PeerRelaySignals | None = None  #: peer relay messages, and its server (issue 14)
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
        loop.call_later(GC_PAUSE_MAX, resume_gc)  # off since the command began (startup.main)
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
                if not main.cancelled() and (err := main.exception()) is not None:
                    # logged before the tear-down: a signal handled after this line did not cause it
                    log.error("start-up failed: %s", err)
                main.result()  # DaemonError from start-up
        finally:
            stopped.cancel()
            sdnotify.notify("STOPPING=1")
            await teardown.tear_down(self)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await teardown.cancel_leftovers()
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
        try:
            self._lock = self.store.lock()  # one daemon per state dir, held until we exit
        except StateError as e:
            raise DaemonError(str(e)) from None
        creds = self.creds = enrollment.open_credentials(self.opts, self.store, self.clock)
        self._client = creds.client
        # The interface needs nothing from the coordinator: wireguard-go starts while enrollment waits on the
        # network (issue 15). (No thread imports the deferred modules meanwhile: measured, its GIL held up
        # the loop; enrollment took 150-250 ms instead of 83-118.)
        interface = asyncio.create_task(self._create_interface(), name="meshd-interface")
        await enrollment.enroll_alongside(creds, self.opts, interface)
        # the map stream opens while the interface is configured; maps wait for `ready` (issue 15: the
        # stream's handshake and first map took 100-200 ms after "meshd up" when opened last)
        ready = asyncio.Event()
        self._start_session(ready)
        await interface
        await self._bring_up(creds)
        await self._start_paths(creds)
        self._api = api.ControlServer(self.store.socket_path, LocalCommands(self).handlers())
        try:
            await self._api.start()
        except api.ApiError as e:
            raise DaemonError(str(e)) from None
        self._metrics = await services.start_metrics(self)
        self._start_loops(creds)
        ready.set()
        sdnotify.notify("READY=1")
        name = creds.enrollment.name
        log.info("meshd up: %s on %s (%s)", name, self.opts.interface, self.kind())
        asyncio.get_running_loop().call_later(GC_AFTER_UP, resume_gc)
        if on_ready is not None:
            on_ready()
        await asyncio.Event().wait()  # until cancelled by run()

    def kind(self) -> str:
        return self.backend.kind if self.backend else "none"

    async def _create_interface(self) -> None:
        """What a crashed meshd left goes, then the WireGuard interface comes up, still unconfigured."""
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
        except WgError as e:
            raise DaemonError(str(e)) from None

    async def _bring_up(self, creds: Credentials) -> None:
        """The created interface gets the node's key, addresses and resolver; the hosts block is reset."""
        assert self.backend is not None
        try:
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
        self.paths.relay_ports(self.relay.use, self.relay.is_relay_address)
        self.relay.on_moved = self.paths.relay_moved
        self.signals = PeerRelaySignals(self._client, self.relay, self._send_signal)
        # a peer relay must know its public address: only STUN (probing, the raw socket) tells
        if self.opts.peer_relay_ports is not None and self.paths.probing:
            self.signals.serve(self.opts.peer_relay_ports, self.opts.interface)
        self.applier.relay, self.applier.paths = self.relay, self.paths
        if self.paths.probing:
            label = f"{creds.enrollment.name}/{self.opts.interface}"
            self.portmap = PortMapShell(self._port, label, self.paths.set_portmap)
            try:
                await self.portmap.start()
            except OSError as e:
                log.warning("no port maps: %s", e)

    def _start_session(self, ready: asyncio.Event) -> None:
        """The map stream, held open from now on; each map is applied once ``ready`` is set."""
        assert self._client is not None

        async def apply(m: netmap.NetMap) -> None:
            await ready.wait()
            assert self.applier is not None
            await self.applier.apply(m)

        self.session = ControlSession(
            self._client,
            on_map=apply,
            on_signal=self._on_signal,
            on_revoked=self._revoked,
            candidates=lambda: self.paths.candidates() if self.paths else [],
            current_map=lambda: self.applier.map if self.applier else None,
        )
        self.tasks.start("stream", self.session.run, give_up_after=GIVE_UP_AFTER)

    def _start_loops(self, creds: Credentials) -> None:
        assert self.applier is not None and self._client is not None
        applier = self.applier
        creds.on_rekey = self._rekey
        kw: dict[str, Any] = {"give_up_after": GIVE_UP_AFTER}
        self.tasks.start("renew", lambda: creds.renew_loop(lambda: applier.map), **kw)
        self.tasks.start("watch", lambda: localnet.watch(self.opts.interface, self._local_changed), **kw)
        services.start_loops(self, self._client, GIVE_UP_AFTER)
        if self.opts.key_rotation > 0:
            every = self.opts.key_rotation
            self.tasks.start("rotate", lambda: creds.rotation_loop(self.opts.state_dir, every), **kw)

    # -- events from the pieces ----------------------------------------------------------------------------

    async def _announce(self, candidates: list[str]) -> None:
        if self.session is not None:
            await self.session.announce(candidates)

    async def _send_signal(self, node_id: int, payload: dict[str, Any]) -> None:
        if self.session is not None:
            await self.session.send_signal(node_id, payload)

    def _on_signal(self, node: int, payload: dict[str, Any]) -> None:
        """A signal on the map stream: peer relay messages (issue 14), else call-me-maybe."""
        if self.signals is not None and self.signals.handle(node, payload):
            return
        if self.paths is not None:
            self.paths.on_signal(node, payload)

    def peer_relay_facts(self) -> tuple[str, int, int] | None:
        """(public address, low, high) when this node can be a peer relay (reported to the coordinator)."""
        if self.signals is None or self.paths is None:
            return None
        return self.signals.facts(self.paths.nat, self.local_addresses)

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
            if self.paths is not None:
                self.paths.rekeyed()
        if self.relay is not None:
            self.relay.rekey(self.creds.keys.wg_public)
