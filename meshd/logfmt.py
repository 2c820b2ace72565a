"""Structured logs (logfmt: ``ts=... level=info logger=meshd msg="..."``) on stderr, for journald and grep.

Secrets never reach a log call in this project (keys, pre-auth keys and payloads are not formatted into
messages); this module only shapes the lines.
"""

from __future__ import annotations

import logging
import sys
import time


def _quote(value: str) -> str:
    if value and all(c.isalnum() or c in "-_./:@" for c in value):
        return value
    return '"' + "".join(_ESCAPES.get(c) or _escape_control(c) for c in value) + '"'


#: every control character is escaped (not only newline): a ``\r`` would let a feed-supplied string
#: overwrite the visible line on a terminal, ESC starts terminal escape sequences, and any of them can
#: forge or hide log lines for a reader or a parser
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_control(c: str) -> str:
    if c.isprintable() or c == " ":
        return c
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def escape_controls(text: str) -> str:
    """`text` with every control (non-printable) character escaped, so it stays on one visible line."""
    if text.isprintable():
        return text
    return "".join(_ESCAPES.get(c, c) if c in "\n\r\t" else _escape_control(c) for c in text)


class EscapingFormatter(logging.Formatter):
    """A classic ``%``-style formatter whose whole output (message, traceback) has its control
    characters escaped: the coordinator logs strings its clients chose (host names, endpoints, feed
    values), and one record must never become two lines or carry terminal escape sequences."""

    def format(self, record: logging.LogRecord) -> str:
        return escape_controls(super().format(record))


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        parts = [
            f"ts={ts}",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
            f"msg={_quote(record.getMessage())}",
        ]
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "httpcore", "websockets", "pyroute2"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
