"""coordinator command line (DESIGN.md §2). The global ``--state-dir`` comes before the subcommand.

Same convention as meshd's CLI (meshd/clikit.py): expected failures print `error: <what happened>; <what
to do>` on stderr and exit non-zero (2 for usage errors), never a traceback; the root callback keeps the
global options on ``ctx.obj`` (:class:`Globals`); `--json` prints exactly one JSON document on stdout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape as markup_escape
from rich.table import Table

from coordinator import adminclient
from coordinator.completion import node_names, user_names
from coordinator.errors import CoordinatorError
from coordinator.settings import DEFAULT_STATE_DIR, load_settings, parse_duration
from meshd import eventloop
from meshd.clikit import fail, options, run
from meshd.logfmt import EscapingFormatter

if TYPE_CHECKING:
    from coordinator import sharedsecrets

app = typer.Typer(
    help="coordinator: the mesh VPN control plane",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion: node and user names (completion.py)
    pretty_exceptions_enable=False,
)
users_app = typer.Typer(help="Manage users.", no_args_is_help=True)
keys_app = typer.Typer(help="Manage pre-auth keys.", no_args_is_help=True)
nodes_app = typer.Typer(help="Manage nodes.", no_args_is_help=True)
policy_app = typer.Typer(help="Show or set the policy.", no_args_is_help=True)
audit_app = typer.Typer(help="Read and verify the audit trail.", no_args_is_help=True)
relay_app = typer.Typer(help="Standalone relay regions.", no_args_is_help=True)
tokens_app = typer.Typer(help="Scoped admin API tokens (remote CLI, API, dashboard).", no_args_is_help=True)
routes_app = typer.Typer(help="Subnet routes and exit nodes: list, approve, remove.", no_args_is_help=True)
for sub, name in (
    (routes_app, "routes"),
    (users_app, "users"),
    (keys_app, "keys"),
    (nodes_app, "nodes"),
    (policy_app, "policy"),
    (audit_app, "audit"),
    (relay_app, "relay"),
    (tokens_app, "tokens"),
):
    app.add_typer(sub, name=name)

out = Console(highlight=False, soft_wrap=True)


@dataclass(frozen=True, slots=True)
class Globals:
    """The global options (before the subcommand), stored on ``ctx.obj`` by the root callback."""

    state_dir: Path
    state_dir_given: bool
    #: a remote coordinator (`--url`, `--token-file`, `--ca-cert`): admin calls go there, not to admin.sock
    url: str | None = None
    token_file: Path | None = None
    ca_cert: Path | None = None


def _setup_logging() -> None:
    """Root logging on stderr; every control character escaped (clients choose many logged strings)."""
    handler = logging.StreamHandler()
    handler.setFormatter(EscapingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])


def _admin(ctx: typer.Context, method: str, path: str, body: Any = None) -> Any:
    given = options(ctx, Globals)
    try:
        if given.url is not None:
            if given.token_file is None:
                fail("--url needs --token-file (or $COORDINATOR_TOKEN_FILE) with an admin token")
            token = adminclient.read_token_file(given.token_file)
            return adminclient.call_remote(given.url, token, method, path, body, ca_cert=given.ca_cert)
        return adminclient.call(given.state_dir / "admin.sock", method, path, body)
    except adminclient.AdminError as exc:
        fail(str(exc))


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except CoordinatorError as exc:
        fail(exc.message)


def _json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True) + "\n")


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


StateDir = Annotated[
    Path | None, typer.Option("--state-dir", help="State directory (admin.sock lives here).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]
NodeArg = Annotated[str, typer.Argument(help="A node's name.", autocompletion=node_names)]


@app.callback()
def root(
    ctx: typer.Context,
    state_dir: StateDir = None,
    url: Annotated[
        str | None,
        typer.Option(
            "--url", envvar="COORDINATOR_URL", help="Drive a remote coordinator (https://HOST:PORT)."
        ),
    ] = None,
    token_file: Annotated[
        Path | None,
        typer.Option(
            "--token-file", envvar="COORDINATOR_TOKEN_FILE", help="File with an admin token (--url)."
        ),
    ] = None,
    ca_cert: Annotated[
        Path | None,
        typer.Option("--ca-cert", help="PEM CA that signed the remote coordinator's certificate."),
    ] = None,
) -> None:
    """The coordinator of the mesh: server and admin commands."""
    env = os.environ.get("COORDINATOR_STATE_DIR")
    chosen = state_dir or (Path(env) if env else DEFAULT_STATE_DIR)
    ctx.obj = Globals(chosen, state_dir is not None, url, token_file, ca_cert)


# ------------------------------------------------------------------------------------------------- serve
@app.command()
def serve(
    ctx: typer.Context,
    listen: Annotated[str | None, typer.Option(help="HOST:PORT for nodes.")] = None,
    state_dir: StateDir = None,
    database: Annotated[
        str | None, typer.Option(help="SQLAlchemy URL (default SQLite in the state dir).")
    ] = None,
    tls_cert: Annotated[Path | None, typer.Option("--tls-cert", help="PEM certificate for HTTPS.")] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", help="PEM private key for HTTPS.")] = None,
    prefix: Annotated[str | None, typer.Option(help="IPv4 overlay prefix (default 100.64.0.0/10).")] = None,
    stun_port: Annotated[int | None, typer.Option("--stun-port", help="STUN UDP port.")] = None,
    no_relay: Annotated[bool, typer.Option("--no-relay", help="Do not run the embedded relay.")] = False,
    relay_udp_ports: Annotated[
        str | None,
        typer.Option(
            "--relay-udp-ports", help="UDP relay port range LOW-HIGH (0: none; default 40000-40999)."
        ),
    ] = None,
    relay_region_id: Annotated[
        int | None,
        typer.Option(
            "--relay-region-id",
            help="Region id of the embedded relay: one per replica (default 1; automatic on PostgreSQL).",
        ),
    ] = None,
    cert_lifetime: Annotated[
        str | None, typer.Option("--cert-lifetime", help="Node certificate lifetime.")
    ] = None,
    public_url: Annotated[str | None, typer.Option("--public-url", help="URL nodes use to reach us.")] = None,
    listen_ipv6: Annotated[
        str | None,
        typer.Option("--listen-ipv6", help="Also serve nodes, relay and STUN on this IPv6 address."),
    ] = None,
    metrics_listen: Annotated[
        str | None,
        typer.Option("--metrics-listen", help="HOST:PORT for /metrics (then 404 on the node port)."),
    ] = None,
    audit_syslog: Annotated[
        str | None,
        typer.Option("--audit-syslog", help="Send audit records (RFC 5424) to HOST:PORT (UDP) or unix:PATH."),
    ] = None,
    audit_jsonl: Annotated[
        Path | None, typer.Option("--audit-jsonl", help="Append audit records to FILE as JSON lines.")
    ] = None,
    audit_retention: Annotated[
        str | None, typer.Option("--audit-retention", help="Drop audit records older than this (e.g. 400d).")
    ] = None,
    audit_ip_prefix: Annotated[
        str | None,
        typer.Option("--audit-ip-prefix", help="Truncate IP addresses in audit records: V4BITS/V6BITS."),
    ] = None,
    ephemeral_timeout: Annotated[
        str | None,
        typer.Option("--ephemeral-timeout", help="Remove ephemeral nodes offline this long (default 3m)."),
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", help="TOML settings file.")] = None,
    secrets_key_file: Annotated[
        Path | None,
        typer.Option(
            "--secrets-key-file",
            help="Key sealing the secrets replicas share in the database (else $COORDINATOR_SECRETS_KEY).",
        ),
    ] = None,
) -> None:
    """Run the coordinator server (foreground)."""
    from coordinator.server import serve as run_server

    given = options(ctx, Globals)
    flags: dict[str, Any] = {
        "listen": listen,
        "database": database,
        "tls_cert": tls_cert,
        "tls_key": tls_key,
        "prefix": prefix,
        "stun_port": stun_port,
        "relay": False if no_relay else None,
        "relay_udp_ports": relay_udp_ports,
        "relay_region_id": relay_region_id,
        "cert_lifetime": cert_lifetime,
        "public_url": public_url,
        "listen_ipv6": listen_ipv6,
        "metrics_listen": metrics_listen,
        "audit_syslog": audit_syslog,
        "audit_jsonl": audit_jsonl,
        "audit_retention": audit_retention,
        "audit_ip_prefix": audit_ip_prefix,
        "state_dir": state_dir or (given.state_dir if given.state_dir_given else None),
        "ephemeral_timeout": ephemeral_timeout,
        "secrets_key_file": secrets_key_file,
    }
    settings = load_settings(flags, config_file=config)
    _setup_logging()
    with contextlib.suppress(KeyboardInterrupt):
        eventloop.run(run_server(settings))  # uvloop when installed (the relay data path)


# ------------------------------------------------------------------------------------------------- users
@users_app.command("create")
def users_create(ctx: typer.Context, name: str, as_json: JsonOpt = False) -> None:
    """Create a user."""
    user = _admin(ctx, "POST", "/admin/users", {"name": name})
    if as_json:
        _json(user)
    else:
        out.print(f"created user {user['name']}")


@users_app.command("list")
def users_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List users."""
    users = _admin(ctx, "GET", "/admin/users")
    if as_json:
        _json(users)
        return
    table = Table("ID", "NAME", "CREATED")
    for u in users:
        table.add_row(str(u["id"]), u["name"], _when(u["created_at"]))
    out.print(table)


# -------------------------------------------------------------------------------------------------- keys
@keys_app.command("create")
def keys_create(
    ctx: typer.Context,
    user: Annotated[
        str,
        typer.Option("--user", help="Owner of the nodes enrolled with the key.", autocompletion=user_names),
    ],
    reusable: Annotated[bool, typer.Option("--reusable", help="Allow many enrollments.")] = False,
    expiration: Annotated[str, typer.Option("--expiration", help="Lifetime, e.g. 30m, 1h, 7d.")] = "1h",
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="Tag for enrolled nodes (repeatable).")
    ] = None,
    ephemeral: Annotated[
        bool,
        typer.Option("--ephemeral", help="Enrolled nodes are removed when offline a while or on meshd down."),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Create a pre-auth key; the key is the last word printed."""
    seconds = _duration(expiration)
    key = _admin(
        ctx,
        "POST",
        "/admin/keys",
        {
            "user": user,
            "reusable": reusable,
            "expiration": seconds,
            "tags": tag or [],
            "ephemeral": ephemeral,
        },
    )
    if as_json:
        _json(key)
        return
    kind = ("reusable" if key["reusable"] else "single-use") + (" ephemeral" if key.get("ephemeral") else "")
    sys.stdout.write(f"{kind} key for {key['user']}, expires {_when(key['expires_at'])}:\n{key['key']}\n")


# --------------------------------------------------------------------------------------------------- dns
dns_app = typer.Typer(help="Admin-defined DNS records (every node's resolver).", no_args_is_help=True)
app.add_typer(dns_app, name="dns")


@dns_app.command("set")
def dns_set(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Name under the mesh domain, e.g. printer or db.prod.")],
    ip: Annotated[str, typer.Argument(help="IPv4 or IPv6 address.")],
) -> None:
    """Set NAME.<domain> to IP on every node's resolver (replaces an earlier address)."""
    r = _admin(ctx, "PUT", f"/admin/dns/{urllib.parse.quote(name, safe='')}", {"ip": ip})
    sys.stdout.write(f"{r['name']} -> {r['ip']}\n")


@dns_app.command("list")
def dns_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List the admin-defined DNS records."""
    records = _admin(ctx, "GET", "/admin/dns")
    if as_json:
        _json(records)
        return
    table = Table("NAME", "IP", "SET")
    for r in records:
        table.add_row(r["name"], r["ip"], _when(r["created_at"]))
    out.print(table)


@dns_app.command("remove")
def dns_remove(ctx: typer.Context, name: Annotated[str, typer.Argument(help="The record's name.")]) -> None:
    """Remove an admin-defined DNS record."""
    _admin(ctx, "DELETE", f"/admin/dns/{urllib.parse.quote(name, safe='')}")
    sys.stdout.write(f"removed {name}\n")


# ------------------------------------------------------------------------------------------------- nodes
@nodes_app.command("list")
def nodes_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List nodes."""
    nodes = _admin(ctx, "GET", "/admin/nodes")
    if as_json:
        _json(nodes)
        return
    table = Table("ID", "NAME", "USER", "IPS", "TAGS", "STATE", "CERT UNTIL")
    for n in nodes:
        state = "expired" if n["expired"] else ("online" if n["online"] else "offline")
        table.add_row(
            str(n["id"]),
            n["name"],
            n["user"] or "-",
            " ".join(n["ips"]),
            ",".join(n["tags"]) or "-",
            state,
            _when(n["cert_not_after"]),
        )
    out.print(table)


@nodes_app.command("remove")
def nodes_remove(
    ctx: typer.Context,
    name: NodeArg,
    release: Annotated[
        bool,
        typer.Option(
            "--release",
            help="Let new nodes have its name and address at once (no quarantine); on a removed node's "
            "name, end its quarantine.",
        ),
    ] = False,
) -> None:
    """Remove a node (revoked at once). Its name and address go to no new node for the quarantine
    period (setting `quarantine`, default 24h) unless --release."""
    _admin(ctx, "DELETE", f"/admin/nodes/{_seg(name)}" + ("?release=true" if release else ""))
    out.print(
        f"removed node {name}; its name and address are free for new nodes"
        if release
        else f"removed node {name}"
    )


@nodes_app.command("expire")
def nodes_expire(ctx: typer.Context, name: NodeArg) -> None:
    """Expire a node: it leaves every map and can no longer renew."""
    _admin(ctx, "POST", f"/admin/nodes/{_seg(name)}/expire")
    out.print(f"expired node {name}")


@nodes_app.command("rename")
def nodes_rename(ctx: typer.Context, old: NodeArg, new: str) -> None:
    """Rename a node."""
    _admin(ctx, "POST", f"/admin/nodes/{_seg(old)}/rename", {"new_name": new})
    out.print(f"renamed node {old} to {new}")


@nodes_app.command("approve")
def nodes_approve(ctx: typer.Context, code: str, as_json: JsonOpt = False) -> None:
    """Enroll a machine that is waiting with CODE."""
    node = _admin(ctx, "POST", "/admin/approve", {"code": code})
    if as_json:
        _json(node)
    else:
        out.print(f"approved node {node['name']} ({' '.join(node['ips'])})")


@nodes_app.command("pending")
def nodes_pending(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List machines waiting for approval (approve one with `nodes approve CODE`)."""
    waiting = _admin(ctx, "GET", "/admin/pending")
    if as_json:
        _json(waiting)
        return
    table = Table("CODE", "HOSTNAME", "WAITING SINCE", "EXPIRES")
    for w in waiting:
        table.add_row(
            markup_escape(str(w["code"])),
            markup_escape(str(w["hostname"])),
            _when(w["created_at"]),
            _when(w["expires_at"]),
        )
    out.print(table)


@nodes_app.command("tag")
def nodes_tag(ctx: typer.Context, name: NodeArg, tags: list[str]) -> None:
    """Set a node's tags."""
    result = _admin(ctx, "POST", f"/admin/nodes/{_seg(name)}/tags", {"tags": tags})
    out.print(f"node {name} tags: {', '.join(result['tags']) or '-'}")


@nodes_app.command("relay")
def nodes_relay(ctx: typer.Context, name: NodeArg, state: str) -> None:
    """Make a node a peer relay for other nodes (on) or stop it (off); it needs a public address."""
    if state not in ("on", "off"):
        fail(f"relay state must be on or off, not {state!r}")
    result = _admin(ctx, "POST", f"/admin/nodes/{_seg(name)}/relay", {"on": state == "on"})
    out.print(f"node {name} peer relay: {'on' if result['on'] else 'off'}")


def _seg(name: str) -> str:
    if not name or "/" in name or name in (".", ".."):
        fail(f"bad node name {name!r}")
    return name


# ------------------------------------------------------------------------------------------------ routes
@routes_app.command("list")
def routes_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Every node's advertised and approved routes (0.0.0.0/0 and ::/0: exit node)."""
    rows = _admin(ctx, "GET", "/admin/routes")
    if as_json:
        _json(rows)
        return
    table = Table("NODE", "PREFIX", "ADVERTISED", "APPROVED", "PRIMARY")
    for r in rows:
        yes = {True: "yes", False: "no"}
        table.add_row(r["node"], r["prefix"], yes[r["advertised"]], yes[r["approved"]], yes[r["primary"]])
    out.print(table)


@routes_app.command("approve")
def routes_approve(ctx: typer.Context, node: str, prefix: str) -> None:
    """Let NODE route PREFIX (a CIDR, or `exit` for 0.0.0.0/0 and ::/0) for the nodes the policy allows."""
    r = _admin(ctx, "POST", f"/admin/nodes/{_seg(node)}/routes/approve", {"prefix": prefix})
    out.print(f"approved {', '.join(r['approved'])} on node {node}")


@routes_app.command("remove")
def routes_remove(ctx: typer.Context, node: str, prefix: str) -> None:
    """Withdraw the approval of PREFIX (or `exit`) on NODE: peers stop routing it through NODE at once."""
    r = _admin(ctx, "POST", f"/admin/nodes/{_seg(node)}/routes/remove", {"prefix": prefix})
    out.print(f"removed {', '.join(r['removed'])} from node {node}")


# ------------------------------------------------------------------------------------------------ policy
@policy_app.command("get")
def policy_get(ctx: typer.Context) -> None:
    """Print the policy."""
    policy = _admin(ctx, "GET", "/admin/policy")
    if not policy["set"]:
        out.print("no policy set: everything is allowed")
    else:
        sys.stdout.write(policy["policy"] if policy["policy"].endswith("\n") else policy["policy"] + "\n")


@policy_app.command("set")
def policy_set(ctx: typer.Context, file: Path) -> None:
    """Replace the policy with the contents of FILE."""
    try:
        text = file.read_text()
    except OSError as exc:
        fail(f"cannot read {file}: {exc.strerror}")
    except UnicodeDecodeError:
        fail(f"{file} is not UTF-8 text")
    _admin(ctx, "PUT", "/admin/policy", {"policy": text})
    out.print("policy updated")


# ------------------------------------------------------------------------------------------------- audit
@audit_app.command("list")
def audit_list(
    ctx: typer.Context,
    as_json: JsonOpt = False,
    since: Annotated[
        str | None,
        typer.Option("--since", help="From then on: an RFC 3339 time (2026-01-01T00:00:00Z) or an age (7d)."),
    ] = None,
) -> None:
    """Show the audit trail (--json streams it page by page: one JSON array, records oldest first)."""
    from coordinator.auditexport import parse_since

    try:
        start = parse_since(since) if since is not None else None
    except ValueError as exc:
        fail(str(exc))
    pages = _audit_pages(ctx, start)
    if as_json:
        first = True
        sys.stdout.write("[")
        for page in pages:
            for r in page:
                sys.stdout.write(("\n  " if first else ",\n  ") + json.dumps(r, sort_keys=True))
                first = False
            sys.stdout.flush()
        sys.stdout.write("\n]\n" if not first else "]\n")
        return
    table = Table("ID", "TIME", "ACTOR", "ACTION", "OBJECT")
    for page in pages:
        for r in page:
            table.add_row(str(r["id"]), r["time"], r["actor"], r["action"], r["object"])
    out.print(table)


AUDIT_PAGE = 500


def _audit_pages(ctx: typer.Context, since: str | None) -> Iterator[list[dict[str, Any]]]:
    """The trail in pages of AUDIT_PAGE records (a long trail never sits in memory whole)."""
    after = 0
    query = f"&since={urllib.parse.quote(since)}" if since is not None else ""
    while True:
        page = _admin(ctx, "GET", f"/admin/audit?limit={AUDIT_PAGE}&after={after}{query}")
        if page:
            yield page
        if len(page) < AUDIT_PAGE:
            return
        after = page[-1]["id"]


@audit_app.command("verify")
def audit_verify(ctx: typer.Context) -> None:
    """Check the hash chain; exits 1 when a record was edited or deleted."""
    result = _admin(ctx, "GET", "/admin/audit/verify")
    if not result["ok"]:
        fail(f"audit trail is broken: {result['problem']}")
    out.print(f"audit trail ok: {result['records']} records, chain intact")


# ---------------------------------------------------------------------------------------- later issues
@app.command("rotate-signing-key")
def rotate_signing_key(
    ctx: typer.Context,
    overlap: Annotated[
        str | None,
        typer.Option("--overlap", help="How long the old key stays trusted (default: the cert lifetime)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """New certificate signing key; every node certificate is re-issued, the old key stays trusted."""
    seconds = _duration(overlap) if overlap is not None else None
    r = _admin(ctx, "POST", "/admin/signing-key/rotate", {"overlap": seconds})
    if as_json:
        _json(r)
        return
    out.print(
        f"signing key {r['key_id']} active; {r['previous_key_id']} trusted until "
        f"{_when(r['trusted_until'])}; {r['reissued']} certificate(s) re-issued"
    )


@relay_app.command("serve")
def relay_serve(
    listen: Annotated[str, typer.Option(help="HOST:PORT")],
    coordinator: Annotated[str, typer.Option(help="Coordinator URL")],
    secret_file: Annotated[
        Path | None,
        typer.Option("--secret-file", help="The coordinator's <state-dir>/relay.secret (or $RELAY_SECRET)."),
    ] = None,
    region_id: Annotated[int, typer.Option("--region-id", help="Region id in the relay map (not 1).")] = 2,
    name: Annotated[str | None, typer.Option("--name", help="Region name (default region<ID>).")] = None,
    public_url: Annotated[str | None, typer.Option("--public-url", help="URL nodes use to reach us.")] = None,
    stun_port: Annotated[int, typer.Option("--stun-port", help="STUN UDP port (0: none).")] = 0,
    udp_ports: Annotated[
        str, typer.Option("--udp-ports", help="UDP relay port range LOW-HIGH (0: none).")
    ] = "40000-40999",
    pong_delay: Annotated[float, typer.Option("--test-pong-delay", hidden=True)] = 0.0,
) -> None:
    """Run a standalone relay region (foreground)."""
    from coordinator.relay.standalone import RelayOptions
    from coordinator.relay.standalone import serve as run_relay
    from coordinator.settings import parse_listen

    if not coordinator.startswith(("http://", "https://")):
        fail(f"coordinator URL {coordinator!r} must start with http:// or https://")
    if region_id < 2 or region_id > 65535:
        fail("--region-id must be between 2 and 65535 (1 is the coordinator's embedded relay)")
    from coordinator.relay import secret as relay_secret

    # fail closed: an empty or short secret (a file cut short by a crash, a placeholder) never goes on
    if secret_file is not None:
        secret = relay_secret.read(secret_file)
    elif "RELAY_SECRET" in os.environ:
        secret = relay_secret.check(os.environ["RELAY_SECRET"], "$RELAY_SECRET")
    else:
        fail("no relay secret: give --secret-file (coordinator's relay.secret) or $RELAY_SECRET")
    from coordinator.relay.udp import parse_range

    try:
        udp_range = parse_range(udp_ports)
    except ValueError as exc:
        fail(f"{exc}; use --udp-ports LOW-HIGH (0 disables them)")
    opts = RelayOptions(
        udp_ports=udp_range,
        listen=parse_listen(listen),
        coordinator=coordinator,
        secret=secret,
        region_id=region_id,
        name=name or f"region{region_id}",
        public_url=public_url,
        stun_port=stun_port,
        pong_delay=pong_delay,
    )
    _setup_logging()
    try:
        with contextlib.suppress(KeyboardInterrupt):
            eventloop.run(run_relay(opts))
    except OSError as exc:
        fail(f"cannot serve the relay on {listen}: {exc.strerror}")


# ------------------------------------------------------------------------------------------------ tokens
@tokens_app.command("create")
def tokens_create(
    ctx: typer.Context,
    scope: Annotated[
        str, typer.Option("--scope", help="read | nodes | keys | policy | audit | admin (docs/design.md).")
    ],
    expiration: Annotated[str, typer.Option("--expiration", help="Lifetime, e.g. 1h, 30d, 90d.")] = "90d",
    description: Annotated[str, typer.Option("--description", help="What the token is for.")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Create an admin API token; the token is the last word printed (shown only this once)."""
    seconds = _duration(expiration)
    t = _admin(
        ctx, "POST", "/admin/tokens", {"scope": scope, "expiration": seconds, "description": description}
    )
    if as_json:
        _json(t)
        return
    sys.stdout.write(
        f"token {t['id']} with scope {t['scope']}, expires {_when(t['expires_at'])}:\n{t['token']}\n"
    )


@tokens_app.command("list")
def tokens_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List admin API tokens (never the tokens themselves)."""
    rows = _admin(ctx, "GET", "/admin/tokens")
    if as_json:
        _json(rows)
        return
    table = Table("ID", "PREFIX", "SCOPE", "STATE", "EXPIRES", "LAST USED", "DESCRIPTION")
    for t in rows:
        table.add_row(
            str(t["id"]),
            t["prefix"] + "...",
            t["scope"],
            t["state"],
            _when(t["expires_at"]),
            _when(t["last_used_at"]),
            t["description"] or "-",
        )
    out.print(table)


@tokens_app.command("revoke")
def tokens_revoke(ctx: typer.Context, token_id: Annotated[int, typer.Argument(metavar="ID")]) -> None:
    """Revoke a token: it is refused from now on, and its dashboard sessions end."""
    _admin(ctx, "DELETE", f"/admin/tokens/{token_id}")
    out.print(f"revoked token {token_id}")


secrets_app = typer.Typer(
    help="The at-rest key of the secrets replicas share in the database.", no_args_is_help=True
)
app.add_typer(secrets_app, name="secrets")


@secrets_app.command("new-key")
def secrets_new_key(
    file: Annotated[Path, typer.Argument(help="Where to write the key (mode 0600; must not exist).")],
) -> None:
    """Make an at-rest key for --secrets-key-file (or its text for $COORDINATOR_SECRETS_KEY)."""
    from coordinator import sharedsecrets

    try:
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        fail(f"cannot create {file}: {exc.strerror}")
    with os.fdopen(fd, "w") as f:
        f.write(sharedsecrets.new_key_text() + "\n")
    out.print(f"wrote a new secrets key to {file}; give the same file to every replica")


@secrets_app.command("rekey")
def secrets_rekey(
    ctx: typer.Context,
    new_key_file: Annotated[
        Path, typer.Option("--new-key-file", help="The key to re-seal the secrets with.")
    ],
    database: Annotated[
        str | None, typer.Option(help="SQLAlchemy URL (default SQLite in the state dir).")
    ] = None,
    secrets_key_file: Annotated[
        Path | None,
        typer.Option("--secrets-key-file", help="The current key (else $COORDINATOR_SECRETS_KEY)."),
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", help="TOML settings file.")] = None,
) -> None:
    """Re-seal the shared secrets with a new at-rest key (one transaction), then restart the replicas
    one by one with the new key."""
    from coordinator import sharedsecrets

    given = options(ctx, Globals)
    flags = {
        "database": database,
        "secrets_key_file": secrets_key_file,
        "state_dir": given.state_dir if given.state_dir_given else None,
    }
    settings = load_settings(flags, config_file=config)
    old = sharedsecrets.key_from(settings.secrets_key_file)
    if old is None:
        fail("give the current key: --secrets-key-file FILE or $COORDINATOR_SECRETS_KEY")
    new = sharedsecrets.key_from(new_key_file)
    assert new is not None
    count = eventloop.run(_rekey(settings.database_url, old, new))
    out.print(f"re-sealed {count} shared secret(s) with key {new.id}; restart each replica with the new key")


async def _rekey(url: str, old: sharedsecrets.AtRestKey, new: sharedsecrets.AtRestKey) -> int:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import AsyncSession

    from coordinator import core, sharedsecrets
    from coordinator.db.engine import make_engine, migrate

    engine = make_engine(url)
    try:
        await migrate(engine)
        async with AsyncSession(engine) as session, session.begin():
            if engine.dialect.name == "postgresql":  # not while a replica rotates the signing key
                await session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": core.PG_WRITE_LOCK})
            return await sharedsecrets.rekey(session, old, new)
    finally:
        await engine.dispose()


def main(argv: list[str] | None = None) -> None:
    """Entry point: expected failures become one `error:` line on stderr and a non-zero exit."""
    run(app, argv, expected=(CoordinatorError,))
