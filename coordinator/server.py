"""`coordinator serve`: the node app on TCP (optionally TLS) and the admin app on the unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
from collections.abc import Iterator

import uvicorn

from coordinator import gcpolicy, peerrelays
from coordinator.app import create_admin_app, create_app, create_metrics_app
from coordinator.core import Core
from coordinator.errors import CoordinatorError
from coordinator.relay import secret as relay_secret
from coordinator.relay import udp as relay_udp
from coordinator.relay.front import PreAuth, server_tls
from coordinator.relay.front import install as install_front
from coordinator.relay.service import RelayService
from coordinator.settings import Settings, parse_listen, prepare_state_dir
from coordinator.stun import start_stun
from meshd import sdnotify
from meshd.supervise import supervise

log = logging.getLogger("coordinator")


class ServeError(CoordinatorError):
    pass


class _Server(uvicorn.Server):
    """uvicorn server that leaves signal handling to `serve` (two servers share one process)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _admin_socket(settings: Settings) -> socket.socket:
    path = settings.admin_socket
    if path.exists():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale socket from a previous run
        else:
            raise ServeError(f"another coordinator is already serving {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return sock


def _tcp_socket(settings: Settings, listen: str | None = None) -> socket.socket:
    listen = listen or settings.listen
    host, port = parse_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on accepted sockets of such a listener, and
    # without it every keep-alive response stalls ~40 ms (Nagle vs delayed ACK)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {listen}: {exc.strerror}") from None
    return sock


def _tls(settings: Settings) -> ssl.SSLContext | None:
    if not settings.tls_cert:
        return None
    try:
        return server_tls(str(settings.tls_cert), str(settings.tls_key or settings.tls_cert))
    except (OSError, ssl.SSLError) as exc:
        raise ServeError(f"cannot load --tls-cert/--tls-key: {exc}") from None


async def serve(settings: Settings) -> None:
    prepare_state_dir(settings.state_dir)  # 0700 before the database, keys and socket appear in it
    # fail closed before anything listens: an empty or short relay.secret is refused, never used
    relay_secret.load_or_create(settings.state_dir)
    tcp = _tcp_socket(settings)
    v6 = settings.listen_ipv6_addr
    # the node API and the relay on IPv6 as well (issue 15), same port
    tcp6 = _tcp_socket(settings, f"[{v6}]:{tcp.getsockname()[1]}") if v6 else None
    metrics_tcp = _tcp_socket(settings, settings.metrics_listen) if settings.metrics_listen else None
    uds = _admin_socket(settings)
    core = Core(settings)
    stun_transports: list[asyncio.DatagramTransport] = []
    try:
        await core.start()
        if settings.stun_port:
            try:
                stun_transports = await start_stun(settings.listen_host_port[0], settings.stun_port)
                if v6:
                    stun_transports += await start_stun(v6, settings.stun_port)
            except OSError as exc:
                raise ServeError(
                    f"cannot serve STUN on udp/{settings.stun_port}+1: {exc.strerror}; "
                    "pick another --stun-port (0 disables STUN)"
                ) from None
        node_app = create_app(settings, core=core)
        admin_app = create_admin_app(core)
        if not settings.tls_cert:
            log.warning("serving plain HTTP on %s: use --tls-cert/--tls-key outside a lab", settings.listen)
        relay: RelayService = node_app.state.relay
        relay.start()
        if relay.hub is not None:  # UDP relay ports (issue 14), next to the embedded relay
            try:
                udp_ports = relay_udp.parse_range(settings.relay_udp_ports)
            except ValueError as exc:
                raise ServeError(f"{exc}; use --relay-udp-ports LOW-HIGH (0 disables them)") from None
            if udp_ports is not None:
                relay_udp.start(
                    relay.hub,
                    settings.listen_host_port[0],
                    udp_ports,
                    may_talk=relay_udp.policy_check(core.state),
                    kernel=relay_udp.kernel_forwarder(relay.hub.region_id),
                )
        node_config = uvicorn.Config(
            node_app,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=2,
            ws=settings.websocket_impl,
            ws_max_size=1 << 20,
            ws_ping_interval=20,
            ws_ping_timeout=20,
            backlog=4096,
            # an idle keep-alive connection (after a first request, so past the front's pre-auth deadline)
            # is closed after this long; uvicorn's default, stated because the limits rely on it
            timeout_keep_alive=5,
            # no ssl_certfile: the front does TLS itself, so the handshake is under its deadline and caps
        )
        preauth = PreAuth(settings.preauth_timeout, settings.preauth_max, settings.preauth_max_per_source)
        # the relay Upgrade on the API port, and the pre-auth deadline and caps also without a relay
        install_front(node_config, relay.hub, preauth, _tls(settings))
        node_server = _Server(node_config)
        admin_server = _Server(
            uvicorn.Config(admin_app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2)
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        tasks = [
            asyncio.create_task(node_server.serve(sockets=[tcp] if tcp6 is None else [tcp, tcp6])),
            asyncio.create_task(admin_server.serve(sockets=[uds])),
        ]
        servers = [node_server, admin_server]
        # peer relays (issue 14): a background planner; its failures are logged and it restarts
        planner = asyncio.create_task(supervise("peer-relays", lambda: peerrelays.run(core)))
        # long-lived state out of the full collections' way (coordinator/gcpolicy.py: 1 s pauses at 10k)
        gc_policy = asyncio.create_task(supervise("gc-policy", gcpolicy.run))
        if metrics_tcp is not None:
            metrics_config = uvicorn.Config(
                create_metrics_app(core), log_level="warning", lifespan="off", timeout_graceful_shutdown=2
            )
            install_front(metrics_config, None, PreAuth(settings.preauth_timeout, 64, 16))
            metrics_server = _Server(metrics_config)
            servers.append(metrics_server)
            tasks.append(asyncio.create_task(metrics_server.serve(sockets=[metrics_tcp])))
            mhost, mport = metrics_tcp.getsockname()[:2]
            log.info("metrics on %s:%d (not on the node port)", mhost, mport)
        host, port = tcp.getsockname()[:2]
        if tcp6 is not None:
            log.info("coordinator listening on [%s]:%d too", v6, port)
        log.info("coordinator listening on %s:%d, admin socket %s", host, port, settings.admin_socket)
        print(f"coordinator listening on {host}:{port} (admin socket {settings.admin_socket})", flush=True)
        sdnotify.ready(f"listening on {host}:{port}")
        waiter = asyncio.create_task(stop.wait())
        await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
        sdnotify.stopping()
        for server in servers:
            server.should_exit = True
        for background in (planner, gc_policy):
            background.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await background
        await relay.stop()
        # close streams so graceful shutdown doesn't wait on them
        await core.hub.stop()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for t in stun_transports:
            t.close()
        await core.stop()
        with contextlib.suppress(OSError):
            settings.admin_socket.unlink()
        tcp.close()
        if tcp6 is not None:
            tcp6.close()
        uds.close()
        if metrics_tcp is not None:
            metrics_tcp.close()
