"""Server settings from CLI flags, `COORDINATOR_*` environment variables and an optional TOML file.

Precedence: flag > environment > TOML file > default. Durations accept `90`, `30s`, `15m`, `1h`, `7d`.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from coordinator.errors import BadRequest

DEFAULT_STATE_DIR = Path("/var/lib/coordinator")
STATE_DIR_MODE = 0o700  #: the state dir holds the database, the signing key and the admin socket

log = logging.getLogger("coordinator")


class SettingsError(BadRequest):
    """A setting is missing or malformed."""


@dataclass(frozen=True, slots=True)
class Settings:
    state_dir: Path = DEFAULT_STATE_DIR
    listen: str = "127.0.0.1:8080"
    database: str | None = None  #: SQLAlchemy URL; default SQLite in the state dir
    tls_cert: Path | None = None
    tls_key: Path | None = None
    prefix: str = "100.64.0.0/10"
    domain: str = "mesh"
    public_url: str | None = None  #: how nodes reach us (relay map); default from `listen`
    #: an IPv6 address to serve on as well (node API, relay, STUN on the same ports as `listen`); the relay
    #: map names it, so nodes STUN over IPv6 and IPv6-only nodes reach the relay (issue 15)
    listen_ipv6: str | None = None
    cert_lifetime: float = 24 * 3600.0
    enroll_code_lifetime: float = 3600.0
    challenge_lifetime: float = 60.0
    coalesce: float = 0.05  #: seconds to gather changes before pushing them to streams
    #: a node's endpoints (and, apart, its online flag) are written and fanned out at most once per this
    #: many seconds; the first change goes out at once, later ones within the window wait (the last wins)
    endpoint_write_interval: float = 1.0
    stun_port: int = 3478
    relay: bool = True
    #: UDP relay ports of the embedded relay (issue 14): "LOW-HIGH", or "0" for none (TCP relay only)
    relay_udp_ports: str = "40000-40999"
    #: the embedded relay's region id (issue 16: a region per replica, coordinator/replicarelays.py); 0:
    #: region 1 on SQLite, chosen at the first start and kept in the state dir on PostgreSQL
    relay_region_id: int = 0
    max_body: int = 64 * 1024
    change_log_keep: int = 100_000
    websocket_impl: str = "websockets-sansio"  #: uvicorn's WebSocket protocol implementation
    #: a removed node's name and address (a renamed node's old name) go to no new node for this long
    #: unless the admin releases them; 0 turns the quarantine off
    quarantine: float = 24 * 3600.0
    #: an ephemeral node (`keys create --ephemeral`) offline this long is removed (coordinator/ephemeral.py)
    ephemeral_timeout: float = 180.0
    #: unauthenticated connections (issue 13): a request head or a relay CLIENT_HELLO must arrive within
    #: `preauth_timeout` seconds of accept (a TLS handshake too; later a request body, the next keep-alive
    #: request head and a relay WebSocket's hello: coordinator/relay/front.py); at most `preauth_max` are
    #: held (then the oldest is closed) and
    #: `preauth_max_per_source` per source address (then new ones are refused). With the unit's
    #: LimitNOFILE=65536 the caps leave most descriptors to authenticated nodes and the database.
    preauth_timeout: float = 5.0
    preauth_max: int = 1024
    preauth_max_per_source: int = 64
    #: HOST:PORT serving /metrics (and /healthz) apart from the node API, whose /metrics then answers 404;
    #: None keeps /metrics public on `listen`
    metrics_listen: str | None = None
    #: audit export (coordinator/auditexport.py): RFC 5424 to HOST:PORT (UDP) or unix:PATH; JSON lines
    audit_syslog: str | None = None
    audit_jsonl: Path | None = None
    #: drop audit records older than this many seconds (coordinator/auditretention.py); 0 keeps them all
    audit_retention: float = 0.0
    #: "V4BITS/V6BITS": IP addresses in audit details are truncated to these networks; None keeps them whole
    audit_ip_prefix: str | None = None
    #: the key sealing the secrets replicas share in the database (coordinator/sharedsecrets.py); without
    #: it, $COORDINATOR_SECRETS_KEY; without both, the secrets stay files in the state dir
    secrets_key_file: Path | None = None

    @property
    def database_url(self) -> str:
        return self.database or f"sqlite+aiosqlite:///{self.state_dir / 'coordinator.db'}"

    @property
    def admin_socket(self) -> Path:
        return self.state_dir / "admin.sock"

    @property
    def listen_host_port(self) -> tuple[str, int]:
        return parse_listen(self.listen)

    @property
    def listen_ipv6_addr(self) -> str | None:
        """`listen_ipv6` normalised; SettingsError unless a unicast IPv6 address (not ::, not link-local:
        nodes elsewhere must reach it)."""
        if self.listen_ipv6 is None:
            return None
        try:
            ip = ipaddress.IPv6Address(self.listen_ipv6.strip("[]"))
        except ValueError:
            ip = None
        if ip is None or ip.is_unspecified or ip.is_link_local or ip.is_multicast or ip.scope_id is not None:
            raise SettingsError(
                f"bad listen_ipv6 {self.listen_ipv6!r}: an IPv6 address of this host (not ::, not fe80::/10)"
            )
        return str(ip)

    @property
    def url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host, port = self.listen_host_port
        scheme = "https" if self.tls_cert else "http"
        if ":" in host:
            host = f"[{host}]"
        return f"{scheme}://{host}:{port}"


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str | float | int) -> float:
    """`1h` -> 3600.0; raises SettingsError for anything else than a positive number with unit s/m/h/d."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        value = float(text)
    else:
        m = _DURATION.match(str(text).strip())
        if not m:
            raise SettingsError(f"bad duration {text!r}: expected e.g. 30s, 15m, 1h, 7d")
        value = float(m.group(1)) * _UNITS[m.group(2)]
    if value <= 0:
        raise SettingsError(f"bad duration {text!r}: must be positive")
    return value


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT` or `[v6]:PORT` -> (host, port)."""
    m = re.fullmatch(r"^\[([^\]]+)\]:(\d+)$", text) or re.fullmatch(r"^([^:\[\]]*):(\d+)$", text)
    if not m or not 0 <= int(m.group(2)) <= 65535:
        raise SettingsError(f"bad listen address {text!r}: expected HOST:PORT")
    return (m.group(1) or "0.0.0.0", int(m.group(2)))


_CONVERT: dict[str, Any] = {
    "state_dir": Path,
    "tls_cert": Path,
    "tls_key": Path,
    "cert_lifetime": parse_duration,
    "enroll_code_lifetime": parse_duration,
    "challenge_lifetime": parse_duration,
    "coalesce": float,
    "endpoint_write_interval": float,
    "stun_port": int,
    "relay_udp_ports": str,
    "relay_region_id": int,
    "max_body": int,
    "change_log_keep": int,
    "preauth_timeout": parse_duration,
    "preauth_max": int,
    "preauth_max_per_source": int,
    "metrics_listen": lambda v: str(v) or None,
    "listen_ipv6": lambda v: str(v) or None,
    "audit_syslog": lambda v: str(v) or None,
    "audit_jsonl": Path,
    "secrets_key_file": Path,
    "audit_retention": lambda v: 0.0 if str(v).strip() in ("0", "0s", "0d", "0.0") else parse_duration(v),
    "audit_ip_prefix": lambda v: str(v) or None,
    "quarantine": lambda v: 0.0 if str(v).strip() in ("0", "0s", "0.0") else parse_duration(v),
    "ephemeral_timeout": parse_duration,
    "relay": lambda v: v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes", "on"),
}


def load_settings(
    flags: Mapping[str, Any], env: Mapping[str, str] | None = None, config_file: Path | None = None
) -> Settings:
    """Merge the sources; `flags` entries whose value is None are treated as not given."""
    env = os.environ if env is None else env
    names = {f.name for f in fields(Settings)}
    merged: dict[str, Any] = {}
    config_file = config_file or (Path(env["COORDINATOR_CONFIG"]) if env.get("COORDINATOR_CONFIG") else None)
    if config_file is not None:
        try:
            data = tomllib.loads(config_file.read_text())
        except OSError as exc:
            raise SettingsError(f"cannot read config file {config_file}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"config file {config_file} is not valid TOML: {exc}") from None
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in names:
                raise SettingsError(f"config file {config_file}: unknown setting {key!r}")
            merged[name] = value
    for name in names:
        value = env.get(f"COORDINATOR_{name.upper()}")
        if value is not None:
            merged[name] = value
    merged.update({k: v for k, v in flags.items() if v is not None and k in names})
    settings = Settings()
    try:
        converted = {k: _CONVERT.get(k, _identity)(v) for k, v in merged.items()}
    except (ValueError, TypeError) as exc:
        raise SettingsError(f"bad setting: {exc}") from None
    settings = replace(settings, **converted)
    validate(settings)
    return settings


def _identity(value: Any) -> Any:
    return value


def validate(settings: Settings) -> None:
    settings.listen_host_port  # noqa: B018 - raises SettingsError when malformed
    try:
        net = ipaddress.ip_network(settings.prefix, strict=True)
    except ValueError as exc:
        raise SettingsError(f"bad prefix {settings.prefix!r}: {exc}") from None
    if net.version != 4 or net.prefixlen > 30:
        raise SettingsError(f"bad prefix {settings.prefix!r}: need an IPv4 network of /30 or larger")
    if settings.metrics_listen is not None:
        parse_listen(settings.metrics_listen)
    if settings.listen_ipv6 is not None:
        settings.listen_ipv6_addr  # noqa: B018 - raises SettingsError when malformed
    if settings.audit_syslog is not None or settings.audit_ip_prefix is not None:
        from coordinator import auditexport  # it imports this module

        if settings.audit_syslog is not None:
            auditexport.parse_syslog_target(settings.audit_syslog)
        if settings.audit_ip_prefix is not None:
            auditexport.parse_ip_prefix(settings.audit_ip_prefix)
    if settings.preauth_max < 1 or settings.preauth_max_per_source < 1:
        raise SettingsError("preauth_max and preauth_max_per_source must be at least 1")
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise SettingsError("--tls-cert and --tls-key go together")
    if not 0 <= settings.relay_region_id < 1 << 31:
        raise SettingsError("--relay-region-id must be from 1 to 2^31-1 (0: automatic)")


def prepare_state_dir(path: Path) -> None:
    """Create the state dir 0700 whatever the umask, and tighten one left open by an older version.

    Outside systemd (no `StateDirectoryMode=`) the umask used to decide: 0755 let every local user read
    `coordinator.db`. The mode is set explicitly because mkdir's mode is filtered by the umask and does
    not apply to directories that already exist."""
    try:
        path.mkdir(mode=STATE_DIR_MODE, parents=True, exist_ok=True)
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode != STATE_DIR_MODE:
            if mode & 0o077:
                log.warning("state dir %s was open to others (mode %04o): now 0700", path, mode)
            os.chmod(path, STATE_DIR_MODE)
    except OSError as exc:
        raise SettingsError(f"cannot prepare state dir {path}: {exc.strerror}") from None
