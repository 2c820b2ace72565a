"""meshd command line (DESIGN.md §2). ``--state-dir`` is accepted before or after the subcommand.

Same convention as the coordinator's CLI (meshd/clikit.py): every expected failure is one line on
stderr, ``error: <what>; <what to do>``, and exit status 1 (2 for usage errors), never a traceback; the
root callback keeps the global options on ``ctx.obj`` (:class:`Globals`).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from meshd import api, eventloop, hosts
from meshd import status as st
from meshd.clikit import fail, options, run
from meshd.completion import peer_names
from meshd.logfmt import setup_logging
from meshd.startup import skip_unused_imports
from meshd.state import DEFAULT_STATE_DIR, StateDir

app = typer.Typer(
    help="meshd: the mesh VPN host daemon",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish): meshd/completion.py
    pretty_exceptions_enable=False,
)

StateDirOpt = Annotated[
    Path | None, typer.Option("--state-dir", help="state directory (default /var/lib/meshd)")
]


@dataclass(frozen=True, slots=True)
class Globals:
    """The global options (before the subcommand), stored on ``ctx.obj`` by the root callback."""

    state_dir: Path | None


@app.callback()
def _global(ctx: typer.Context, state_dir: StateDirOpt = None) -> None:
    ctx.obj = Globals(state_dir)


def _state_dir(ctx: typer.Context, local: Path | None) -> Path:
    """``--state-dir`` after the subcommand wins over one before it; then the default."""
    return local or options(ctx, Globals).state_dir or DEFAULT_STATE_DIR


def _call(
    ctx: typer.Context,
    local: Path | None,
    command: str,
    args: dict[str, object] | None = None,
    timeout: float = 10.0,
) -> object:
    try:
        return api.call(StateDir(_state_dir(ctx, local)).socket_path, command, args, timeout=timeout)
    except api.ApiError as e:
        fail(str(e))


@app.command()
def up(
    ctx: typer.Context,
    coordinator: Annotated[
        str | None,
        typer.Option(
            help="coordinator URL, e.g. http://10.0.0.1:8080; replicas: several, comma-separated (fail-over)"
        ),
    ] = None,
    auth_key: Annotated[
        str | None, typer.Option(help="pre-auth key (or env MESHD_AUTH_KEY)", envvar="MESHD_AUTH_KEY")
    ] = None,
    hostname: Annotated[str | None, typer.Option(help="name in the mesh (default: the host name)")] = None,
    state_dir: StateDirOpt = None,
    interface: Annotated[str, typer.Option(help="WireGuard interface name (unique per machine)")] = "mesh0",
    wg_backend: Annotated[str, typer.Option(help="auto, kernel or userspace")] = "auto",
    listen_port: Annotated[int, typer.Option(help="WireGuard UDP port (0: any)", min=0, max=65535)] = 41641,
    hosts_file: Annotated[Path, typer.Option(help="hosts file for peer names")] = hosts.DEFAULT_HOSTS_FILE,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error")] = "info",
    key_rotation: Annotated[
        str, typer.Option(help="rotate the WireGuard key this often (e.g. 30d, 12h; 0: never)")
    ] = "30d",
    dns: Annotated[
        str,
        typer.Option(help="names: auto, resolved (systemd-resolved split DNS), hosts (hosts file) or off"),
    ] = "auto",
    metrics_listen: Annotated[
        str | None, typer.Option(help="HOST:PORT serving Prometheus /metrics (default: off)")
    ] = None,
    advertise_routes: Annotated[
        str, typer.Option(help="offer to route these networks for the mesh, e.g. 10.1.0.0/24,10.2.0.0/16")
    ] = "",
    advertise_exit_node: Annotated[
        bool, typer.Option("--advertise-exit-node", help="offer this node as an exit node (internet)")
    ] = False,
    snat_subnet_routes: Annotated[
        str, typer.Option(help="true: masquerade routed traffic; false: keep mesh source addresses")
    ] = "true",
    exit_node: Annotated[
        str | None, typer.Option(help="send internet traffic through this peer (an approved exit node)")
    ] = None,
    peer_relay_ports: Annotated[
        str,
        typer.Option(
            help="UDP ports served when the coordinator makes this node a peer relay (LOW-HIGH; 0: never)"
        ),
    ] = "41800-41899",
) -> None:
    """Run the daemon in the foreground (enrolls on first start)."""
    if wg_backend not in ("auto", "kernel", "userspace"):
        fail(f"--wg-backend must be auto, kernel or userspace, not {wg_backend!r}")
    if dns not in ("auto", "resolved", "hosts", "off"):
        fail(f"--dns must be auto, resolved, hosts or off, not {dns!r}")
    if log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        fail(f"--log-level must be debug, info, warning or error, not {log_level!r}")
    from meshd.rotation import IntervalError, parse_interval

    try:
        rotate_every = parse_interval(key_rotation)
    except IntervalError as e:
        fail(str(e))
    metrics_at = None
    if metrics_listen is not None:  # prometheus_client is imported only when metrics are asked for
        from meshd.metrics import MetricsListenError, parse_listen

        try:
            metrics_at = parse_listen(metrics_listen)
        except MetricsListenError as e:
            fail(str(e))
    from meshd.routing import parse_advertised

    try:
        advertised = parse_advertised(advertise_routes)
    except ValueError as e:
        fail(f"--advertise-routes: {e}")
    snat = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(
        snat_subnet_routes.lower()
    )
    if snat is None:
        fail(f"--snat-subnet-routes must be true or false, not {snat_subnet_routes!r}")
    from meshd.relay.portserver import parse_range

    try:
        relay_ports = parse_range(peer_relay_ports)
    except ValueError as e:
        fail(f"--peer-relay-ports: {e}")
    setup_logging(log_level.upper())
    skip_unused_imports()
    from meshd.daemon import Daemon, DaemonError, Options  # after the checks: a bad flag needs no daemon

    opts = Options(
        coordinator=coordinator,
        state_dir=_state_dir(ctx, state_dir),
        interface=interface,
        auth_key=auth_key,
        hostname=hostname,
        wg_backend=wg_backend,
        listen_port=listen_port,
        hosts_file=hosts_file,
        key_rotation=rotate_every,
        dns=dns,
        metrics_listen=metrics_at,
        advertise_routes=advertised,
        advertise_exit_node=advertise_exit_node,
        snat_subnet_routes=snat,
        exit_node=None if exit_node in (None, "", "none") else exit_node,
        peer_relay_ports=relay_ports,
    )
    daemon = Daemon(opts)
    try:
        eventloop.run(daemon.run())  # uvloop when installed (meshd/eventloop.py)
    except DaemonError as e:
        fail(str(e))
    except KeyboardInterrupt:
        pass
    if daemon.stop_reason.startswith("this node was removed"):
        fail(daemon.stop_reason)


@app.command()
def down(ctx: typer.Context, state_dir: StateDirOpt = None) -> None:
    """Stop the daemon; it removes its interface and hosts block on the way out."""
    sd = _state_dir(ctx, state_dir)
    sock = StateDir(sd).socket_path
    try:
        api.call(sock, "down")
    except api.ApiError as e:
        from meshd import runtime

        left = asyncio.run(runtime.clean_leftovers(sd))
        if left is None:
            fail(str(e))
        typer.echo(f"meshd was not running; removed its leftovers ({left.interface}, {left.hosts_file})")
        return
    deadline = time.monotonic() + 15
    while sock.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    if sock.exists():
        fail(f"meshd did not stop within 15 s (socket {sock} still there)")
    typer.echo("meshd stopped")


@app.command()
def status(
    ctx: typer.Context,
    json_out: Annotated[bool, typer.Option("--json", help="print the status document as JSON")] = False,
    state_dir: StateDirOpt = None,
) -> None:
    """Show this node, the coordinator connection and every peer with its path."""
    doc = _call(ctx, state_dir, "status")
    if json_out:
        typer.echo(json.dumps(doc, indent=2))
        return
    from rich.console import Console  # here: `meshd up` never draws (issue 15: start-up time)

    try:
        Console().print(st.render(st.Status.from_json(doc)))
    except st.StatusError as e:
        fail(f"meshd sent a status this CLI cannot read: {e}")


@app.command("set")
def set_(
    ctx: typer.Context,
    exit_node: Annotated[
        str, typer.Option(help="send internet traffic through this exit node, or `none` for our own uplink")
    ],
    state_dir: StateDirOpt = None,
) -> None:
    """Change a running daemon's settings (issue 17: the exit node)."""
    r = _call(ctx, state_dir, "set", {"exit_node": None if exit_node == "none" else exit_node}, timeout=15.0)
    assert isinstance(r, dict)
    typer.echo(f"exit node: {r['exit_node'] or 'none'}")


@app.command()
def ping(
    ctx: typer.Context,
    peer: Annotated[str, typer.Argument(help="peer name", autocompletion=peer_names)],
    explain: Annotated[
        bool, typer.Option("--explain", help="say why the path is relayed, from both sides' netcheck")
    ] = False,
    state_dir: StateDirOpt = None,
) -> None:
    """Ping a peer over the mesh and say which path answered."""
    r = _call(ctx, state_dir, "ping", {"peer": peer}, timeout=15.0)
    assert isinstance(r, dict)
    if not r.get("answered"):
        if explain:
            typer.echo(explanation(r))
        fail(f"no answer from {r.get('peer')} ({r.get('ip')}) over the mesh; path: {r.get('path')}")
    via = r["path"] + (f" {r['endpoint']}" if r.get("endpoint") else "")
    typer.echo(f"pong from {r['peer']} ({r['ip']}) via {via} in {r['rtt_ms']:.2f} ms")
    if explain:
        typer.echo(explanation(r))


def explanation(r: dict[str, object]) -> str:
    """``meshd ping --explain``'s lines: the verdict (meshd/why.py), then both sides' facts behind it."""
    path, why, facts = r.get("path"), r.get("why"), r.get("facts")
    if path == "direct":
        head = "direct: nothing to explain"
    elif path == "relay":
        head = f"why relayed: {why or 'unknown'}"
    else:
        head = "no path yet: the peer is offline, or neither a relay nor a direct path is up"
    if isinstance(facts, dict):
        head += f"\n  this node: {facts.get('self')}\n  {r.get('peer')}: {facts.get('peer')}"
    return head


@app.command("rotate-keys")
def rotate_keys(ctx: typer.Context, state_dir: StateDirOpt = None) -> None:
    """Replace this node's WireGuard key; peers learn it through the coordinator, connections continue."""
    r = _call(ctx, state_dir, "rotate-keys", timeout=30.0)
    assert isinstance(r, dict)
    typer.echo(f"new WireGuard public key {r['public_key']} (was {r['old_public_key']})")


@app.command()
def netcheck(
    ctx: typer.Context,
    json_out: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
    state_dir: StateDirOpt = None,
) -> None:
    """What this network allows: UDP, public address(es), NAT mapping, port mapping, relay latency."""
    r = _call(ctx, state_dir, "netcheck", timeout=15.0)
    assert isinstance(r, dict)
    if json_out:
        typer.echo(json.dumps(r, indent=2))
        return
    pm = r["portmap"]
    spoken = ", ".join(p for p in ("upnp", "natpmp", "pcp") if pm.get(p)) or "none"
    varies = {
        True: "yes (endpoint-dependent: direct paths need the peer's help)",
        False: "no",
        None: "unknown",
    }[r["mapping_varies_by_dest"]]
    lines = [
        f"UDP:                 {'yes' if r['udp'] else 'no (relay only)'}",
        f"public address(es):  {', '.join(r['public_addresses']) or '-'}",
        f"mapping varies:      {varies}",
        f"port mapping:        {spoken}"
        + (f" (using {pm['active']}: {pm['mapped']})" if pm.get("active") else ""),
        f"preferred relay:     {r['preferred_relay'] or '-'}",
    ]
    for reg in r["relays"]:
        lat = f"{reg['latency_ms']:.1f} ms" if reg["latency_ms"] is not None else "-"
        lines.append(f"  relay {reg['name']:<12} {lat:>10}  {'connected' if reg['connected'] else ''}")
    typer.echo("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    """Entry point: expected failures become one `error:` line on stderr and a non-zero exit."""
    run(app, argv, expected=(api.ApiError,))


if __name__ == "__main__":
    main()
