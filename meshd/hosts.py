"""meshd's block of names in a hosts file (DESIGN.md §1 "Names").

The block looks like::

    # BEGIN meshd mesh0 (managed by meshd; edits inside are overwritten)
    100.64.0.2 b.mesh b
    100.64.0.3 c.mesh c
    # END meshd mesh0

``mesh0`` is the block's *tag* (the interface name, or anything that tells daemons sharing the file
apart), so several daemons can keep their own blocks in one file. :func:`render` and :func:`remove`
are pure text transforms; :class:`HostsFile` applies them to a file **in place** (the file may be a
bind mount, e.g. in containers, where rename-over does not work): read, transform, and when the text
changed rewrite it from offset 0 and truncate, all under an exclusive ``flock`` (waited for at most
``LOCK_TIMEOUT`` s: a stuck holder must not stall the daemon or its stop). Every line outside
our block stays byte-identical (the file is handled as bytes via ``surrogateescape``).

A peer is written as ``<name>.<domain> <name>``, except when the bare name would shadow a name the file
already gives outside our block (``10.0.0.5 db`` written by the admin, another daemon's block) or a
name resolvers treat specially (``localhost``, ``wpad``...): then only ``<name>.<domain>``. Peers choose
their own names at enrollment, so a peer named ``db`` must not take ``db`` over from the host's own entry
(the first matching line wins in most resolvers, but not in every one, and not for every tool).

A block left incomplete by a crash (a BEGIN without END) is repaired on the next update: the BEGIN line
and the entry lines after it that look like ours are replaced; other lines are kept.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOSTS_FILE = Path("/etc/hosts")
DEFAULT_DOMAIN = "mesh"
LOCK_TIMEOUT = 2.0  #: seconds to wait for another process's lock on the hosts file

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_TAG = re.compile(r"^[A-Za-z0-9._@:/+-]{1,200}$")

_Transform = Callable[[str], str]

#: bare names never written for a peer whatever the file says (the coordinator refuses them too, but a
#: peer's name comes from the network): loopback, broadcast and proxy/tunnel auto-discovery names
RESERVED_NAMES = frozenset(
    {"localhost", "localhost4", "localhost6", "ip6-localhost", "ip6-loopback", "broadcasthost", "wpad",
     "isatap", "gateway", "localdomain"}
)  # fmt: skip


class HostsError(Exception):
    """A hosts file could not be read or written, or an entry is not a valid name/address."""


@dataclass(frozen=True, slots=True)
class HostEntry:
    """One line of the block: ``<ip> <name>.<domain> <name>``."""

    ip: str
    name: str

    def __post_init__(self) -> None:
        # ipaddress keeps an IPv6 zone id verbatim ("fe80::1%x\n10.0.0.1 evil"): only plain literals,
        # so that an entry is always exactly one line
        if not isinstance(self.ip, str) or "%" in self.ip or not self.ip.isprintable():
            raise HostsError(f"not a plain IP address: {self.ip!r}")
        try:
            ipaddress.ip_address(self.ip)
        except ValueError:
            raise HostsError(f"not an IP address: {self.ip!r}") from None
        if not _LABEL.fullmatch(self.name):
            raise HostsError(f"not a valid host name (lowercase letters, digits, '-'): {self.name!r}")

    @classmethod
    def for_peer(cls, name: str, ips: Iterable[str]) -> HostEntry:
        """The entry for a peer: its first IPv4 overlay address (else its first IPv6); prefixes dropped."""
        addrs = [ipaddress.ip_interface(ip).ip for ip in ips]
        if not addrs:
            raise HostsError(f"peer {name!r} has no overlay address")
        addrs.sort(key=lambda a: a.version)
        return cls(str(addrs[0]), name)


def peer_entries(
    peers: Iterable[tuple[str, Iterable[str]]], records: Iterable[tuple[str, str]] = ()
) -> list[HostEntry]:
    """The block's entries for (name, overlay addresses) peers, leaving out a peer whose name is an admin
    DNS record's (the map's ``dns``): the record is the admin's word and the peer chose its name, so
    ``printer.<domain>`` must never point at a peer (issue 12; the coordinator gives such a peer a suffix,
    this is the defence in depth). The peer stays reachable by its address."""
    held = {name.strip().lower().rstrip(".") for name, _ in records}
    return [HostEntry.for_peer(name, ips) for name, ips in peers if name.lower() not in held]


def _markers(tag: str) -> tuple[str, str]:
    if not _TAG.fullmatch(tag):
        raise HostsError(f"invalid hosts block tag {tag!r} (letters, digits and ._@:/+- only)")
    return (f"# BEGIN meshd {tag} (managed by meshd; edits inside are overwritten)", f"# END meshd {tag}")


def _is_begin(line: str, tag: str) -> bool:
    words = line.split()
    return words[:4] == ["#", "BEGIN", "meshd", tag]


def _is_end(line: str, tag: str) -> bool:
    return line.split() == ["#", "END", "meshd", tag]


def _looks_like_entry(line: str, domain: str) -> bool:
    words = line.split()
    if len(words) == 2:  # a peer written without its bare name (it would have shadowed one)
        name, dot, rest = words[1].partition(".")
        return bool(dot) and rest == domain and bool(_LABEL.fullmatch(name))
    return len(words) == 3 and words[1] == f"{words[2]}.{domain}"


def _names_in(lines: Iterable[str]) -> set[str]:
    """Every name the lines give an address to (comments dropped), lowercased as resolvers compare."""
    names: set[str] = set()
    for line in lines:
        words = line.split("#", 1)[0].split()
        names.update(w.lower() for w in words[1:])
    return names


def _lines(text: str) -> list[str]:
    """Lines with their "\\n" (only "\\n" ends a line in a hosts file, unlike str.splitlines)."""
    parts = text.split("\n")
    return [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def _strip_block(lines: list[str], tag: str, domain: str) -> tuple[list[str], int | None]:
    """Lines without our block(s), and the index where the first block was."""
    out: list[str] = []
    at: int | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if _is_begin(line, tag):
            if at is None:
                at = len(out)
            j = i + 1
            while j < len(lines) and not _is_end(lines[j], tag) and not _is_begin(lines[j], tag):
                j += 1
            if j < len(lines) and _is_end(lines[j], tag):
                i = j + 1  # a complete block: drop it whole
                continue
            # no END: a block cut short by a crash; drop the BEGIN and the entries that follow it
            i += 1
            while i < len(lines) and _looks_like_entry(lines[i], domain):
                i += 1
            continue
        if _is_end(line, tag):
            i += 1  # an orphan END line
            continue
        out.append(line)
        i += 1
    return out, at


def render(text: str, tag: str, entries: Sequence[HostEntry], domain: str = DEFAULT_DOMAIN) -> str:
    """``text`` with our block set to ``entries`` (sorted by name), in its old place or at the end; a
    name the rest of the file already has (or a reserved one) is written only as ``<name>.<domain>``."""
    if not all(_LABEL.fullmatch(label) for label in domain.split(".")):
        raise HostsError(f"invalid domain {domain!r}")
    begin, end = _markers(tag)
    rest, at = _strip_block(_lines(text), tag, domain)
    taken = _names_in(rest) | RESERVED_NAMES
    block = [begin + "\n"]
    for e in sorted(entries, key=lambda e: (e.name, e.ip)):
        bare = "" if e.name in taken else f" {e.name}"  # never shadow the host's own names
        block.append(f"{e.ip} {e.name}.{domain}{bare}\n")
    block.append(end + "\n")
    if at is None:
        at = len(rest)
    if at > 0 and not rest[at - 1].endswith("\n"):
        rest[at - 1] += "\n"
    return "".join(rest[:at] + block + rest[at:])


def remove(text: str, tag: str, domain: str = DEFAULT_DOMAIN) -> str:
    """``text`` without our block."""
    _markers(tag)
    rest, _ = _strip_block(_lines(text), tag, domain)
    return "".join(rest)


class HostsFile:
    """Our block in one hosts file, edited in place under an exclusive flock."""

    def __init__(self, path: Path = DEFAULT_HOSTS_FILE, tag: str = "mesh0", domain: str = DEFAULT_DOMAIN):
        _markers(tag)
        self.path = Path(path)
        self.tag = tag
        self.domain = domain

    def update(self, entries: Sequence[HostEntry]) -> bool:
        """Set our block to ``entries``; True when the file changed (no write when it would not)."""
        return self._edit(lambda text: render(text, self.tag, entries, self.domain), create=True)

    def remove(self) -> bool:
        """Delete our block; True when the file changed. A missing file is left missing."""
        return self._edit(lambda text: remove(text, self.tag, self.domain), create=False)

    def _lock(self, fd: int) -> None:
        """The exclusive flock, polled: a blocking flock has no timeout, and these edits run in the
        daemon's event loop (also on the way out, which must end within seconds)."""
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise HostsError(
                        f"hosts file {self.path} is locked by another process (waited {LOCK_TIMEOUT:g} s)"
                    ) from None
                time.sleep(0.01)

    def _edit(self, transform: _Transform, *, create: bool) -> bool:
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        try:
            fd = os.open(self.path, flags, 0o644)
        except FileNotFoundError:
            if create:
                raise HostsError(f"cannot create hosts file {self.path}: directory missing") from None
            return False
        except OSError as e:
            raise HostsError(f"cannot open hosts file {self.path}: {e.strerror}") from None
        try:
            self._lock(fd)
            with os.fdopen(os.dup(fd), "rb") as f:
                old = f.read()
            text = old.decode("utf-8", "surrogateescape")
            new = transform(text).encode("utf-8", "surrogateescape")
            if new == old:
                return False
            os.lseek(fd, 0, os.SEEK_SET)
            view = memoryview(new)
            while view:  # write everything before cutting the tail: a crash leaves extra, not less
                n = os.write(fd, view)
                view = view[n:]
            os.ftruncate(fd, len(new))
            os.fsync(fd)
            return True
        except OSError as e:
            what = "read-only file system" if e.errno == errno.EROFS else e.strerror
            raise HostsError(f"cannot write hosts file {self.path}: {what}") from None
        finally:
            os.close(fd)  # also releases the lock
