"""Shipping the audit trail to the operator's log system, and keeping source addresses coarse.

``coordinator serve --audit-syslog HOST:PORT|unix:PATH --audit-jsonl FILE``: every audit record, once
its transaction committed, goes out as

* one RFC 5424 syslog message (facility 13 "log audit", severity 6 "informational"; MSGID the action;
  the record's fields as structured data ``[meshvpn@32473 ...]``, its details as the JSON message) over
  UDP (RFC 5426) to HOST:PORT, or as a datagram to a local unix socket (``unix:/dev/log``);
* one JSON line (the ``audit list --json`` record) appended to FILE.

The database stays the record (hash chain, signed checkpoints): export is a copy, best effort for syslog
(a datagram that cannot be sent is counted and logged, never retried), a synchronous append for the file.

What a record holds is decided where it is made (coordinator/audit.py refuses secret-looking detail
fields): never a payload, private key, pre-auth key or token. ``--audit-ip-prefix 24/48`` additionally
truncates every IP address in a record's details to its /24 (IPv4) or /48 (IPv6) network before the
record is written, so neither the database nor the export holds a full source address.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

from coordinator.audit import AuditEntry
from coordinator.settings import SettingsError, parse_duration, parse_listen

log = logging.getLogger("coordinator")

FACILITY_AUDIT = 13  #: RFC 5424 §6.2.1 "log audit"
SEVERITY_INFO = 6
SD_ID = "meshvpn@32473"  #: 32473 is the enterprise number RFC 5612 reserves for documentation
APP_NAME = "coordinator"
MAX_DATAGRAM = 8192  #: a record longer than this is cut (its details) rather than dropped
_PRINTUSASCII = re.compile(r"[^\x21-\x7e]")


# --- IP truncation (privacy) ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IpPrefix:
    """How many leading bits of a source address the audit trail keeps."""

    v4: int = 32
    v6: int = 128


def parse_ip_prefix(text: str) -> IpPrefix:
    """``24/48`` (IPv4/IPv6 bits kept) or ``24`` (IPv6 keeps 48); SettingsError otherwise."""
    m = re.fullmatch(r"(\d{1,2})(?:/(\d{1,3}))?", text.strip())
    if m is None or int(m.group(1)) > 32 or (m.group(2) is not None and int(m.group(2)) > 128):
        raise SettingsError(f"bad --audit-ip-prefix {text!r}: expected V4BITS/V6BITS, e.g. 24/48")
    return IpPrefix(int(m.group(1)), int(m.group(2)) if m.group(2) is not None else 48)


def _truncate(value: str, keep: IpPrefix) -> str | None:
    """An address (or ``addr:port``, ``[v6]:port``) as its network; None if ``value`` is no address."""
    text = value.strip()
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:\d+", text) or re.fullmatch(r"(\d+\.\d+\.\d+\.\d+):\d+", text)
    try:
        addr = ipaddress.ip_address(m.group(1) if m else text)
    except ValueError:
        return None
    bits = keep.v4 if addr.version == 4 else keep.v6
    return str(ipaddress.ip_network(f"{addr}/{bits}", strict=False))


def truncate_ips(details: dict[str, Any], keep: IpPrefix) -> dict[str, Any]:
    """``details`` with every top-level string (or list of strings) that is an IP address truncated."""
    out: dict[str, Any] = {}
    for k, v in details.items():
        if isinstance(v, str):
            out[k] = _truncate(v, keep) or v
        elif isinstance(v, list):
            out[k] = [(_truncate(x, keep) or x) if isinstance(x, str) else x for x in v]
        else:
            out[k] = v
    return out


# --- secrets that a client typed where a name goes ----------------------------------------------------

#: a pre-auth key or an admin token (the prefix and 43 URL-safe characters; a hostname is lowercased and
#: "_" made "-"): 20 characters after the prefix are enough to tell one from the 6-character id prefix
_SECRET = re.compile(r"(?i)(mesh(?:key|tok)-[A-Za-z0-9_-]{6})[A-Za-z0-9_-]{14,}")


def redact(value: str) -> str:
    """``value`` with anything shaped like a pre-auth key or token cut to its id prefix: a user who typed
    a key as a hostname must not find it in the log system."""
    return _SECRET.sub(r"\1...(redacted)", value)


def redact_details(details: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in details.items():
        if isinstance(v, str):
            v = redact(v)
        elif isinstance(v, list):
            v = [redact(x) if isinstance(x, str) else x for x in v]
        out[k] = v
    return out


# --- times ---------------------------------------------------------------------------------------------


def iso_utc(text: str) -> str:
    """An RFC 3339 time as the audit trail writes times (UTC, microseconds); a naive time counts as UTC."""
    try:
        t = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not an RFC 3339 time like 2026-01-01T00:00:00Z") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.astimezone(UTC).isoformat(timespec="microseconds")


def parse_since(text: str, now: datetime | None = None) -> str:
    """``--since``: an RFC 3339 time, or an age such as ``90m`` or ``7d`` (that long before now)."""
    try:
        age = parse_duration(text)
    except SettingsError:
        return iso_utc(text)
    return ((now or datetime.now(UTC)) - timedelta(seconds=age)).isoformat(timespec="microseconds")


# --- formats (pure) ------------------------------------------------------------------------------------


def record_json(e: AuditEntry) -> dict[str, Any]:
    """The record as ``audit list --json`` shows it."""
    return {
        "id": e.id,
        "time": e.time,
        "actor": e.actor,
        "action": e.action,
        "object": e.object,
        "details": e.details,
        "prev_hash": e.prev_hash,
        "hash": e.hash,
    }


def jsonl_line(e: AuditEntry) -> bytes:
    return json.dumps(record_json(e), sort_keys=True, separators=(",", ":")).encode() + b"\n"


def _sd_escape(value: str) -> str:
    """RFC 5424 §6.3.3: inside PARAM-VALUE, '"', '\\' and ']' are escaped with a backslash."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _header_field(value: str, limit: int) -> str:
    """A header field: PRINTUSASCII only, at most ``limit`` characters, "-" when empty."""
    return _PRINTUSASCII.sub("_", value)[:limit] or "-"


def syslog_message(e: AuditEntry, hostname: str, procid: int | None = None) -> bytes:
    """One RFC 5424 message (§6): header, structured data with the record's fields, details as MSG."""
    pri = FACILITY_AUDIT * 8 + SEVERITY_INFO
    stamp = e.time.replace("+00:00", "Z")  # RFC 3339 with at most 6 fractional digits (§6.2.3)
    params = {
        "id": str(e.id),
        "actor": e.actor,
        "action": e.action,
        "object": e.object,
        "hash": e.hash,
        "prev_hash": e.prev_hash,
    }
    sd = "[" + SD_ID + "".join(f' {k}="{_sd_escape(v)}"' for k, v in params.items()) + "]"
    header = " ".join(
        (
            f"<{pri}>1",
            stamp,
            _header_field(hostname, 255),
            APP_NAME,
            str(procid if procid is not None else os.getpid()),
            _header_field(e.action, 32),
            sd,
        )
    )
    msg = json.dumps(e.details, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    data = header.encode() + b" \xef\xbb\xbf" + msg.encode()  # BOM: MSG is UTF-8 (§6.4)
    return data[:MAX_DATAGRAM]


# --- sinks (I/O) ---------------------------------------------------------------------------------------


def parse_syslog_target(text: str) -> tuple[int, Any]:
    """``unix:/dev/log`` -> (AF_UNIX, path); ``HOST:PORT`` -> (AF_INET or AF_INET6, (host, port))."""
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise SettingsError(f"bad --audit-syslog {text!r}: expected unix:PATH or HOST:PORT")
        return socket.AF_UNIX, path
    try:
        host, port = parse_listen(text)
    except SettingsError:
        raise SettingsError(f"bad --audit-syslog {text!r}: expected HOST:PORT or unix:PATH") from None
    if not port:
        raise SettingsError(f"bad --audit-syslog {text!r}: the port must not be 0")
    return (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, port)


class SyslogSink:
    """Datagrams to a syslog receiver; never blocks, never raises (a failed send is counted and logged)."""

    def __init__(self, target: str) -> None:
        self.family, self.address = parse_syslog_target(target)
        self.sock = socket.socket(self.family, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.hostname = socket.gethostname()
        self.failed = 0
        self._warned = 0.0

    def send(self, e: AuditEntry) -> None:
        try:
            self.sock.sendto(syslog_message(e, self.hostname), self.address)
        except OSError as exc:
            self.failed += 1
            now = time.monotonic()
            if now - self._warned > 60:  # one warning a minute: a dead receiver must not flood the log
                self._warned = now
                log.warning("audit syslog: cannot send to %s: %s", self.address, exc.strerror or exc)

    def close(self) -> None:
        self.sock.close()


class JsonlSink:
    """Appends one JSON line per record (mode 0600: the trail is for the operator)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.file: IO[bytes] = os.fdopen(fd, "ab", buffering=0)

    def send(self, e: AuditEntry) -> None:
        try:
            self.file.write(jsonl_line(e))
        except OSError as exc:
            log.warning("audit jsonl: cannot append to %s: %s", self.path, exc.strerror or exc)

    def close(self) -> None:
        self.file.close()


class AuditExport:
    """The configured sinks; :meth:`export` runs after an audit record's transaction committed."""

    def __init__(self, syslog: str | None = None, jsonl: Path | None = None) -> None:
        self.sinks: list[SyslogSink | JsonlSink] = []
        try:
            if syslog:
                self.sinks.append(SyslogSink(syslog))
            if jsonl is not None:
                self.sinks.append(JsonlSink(jsonl))
        except OSError as exc:
            self.close()
            raise SettingsError(f"cannot open the audit export: {exc.strerror or exc}") from None

    def __bool__(self) -> bool:
        return bool(self.sinks)

    def export(self, e: AuditEntry) -> None:
        for sink in self.sinks:
            sink.send(e)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []
