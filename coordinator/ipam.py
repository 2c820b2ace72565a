"""Overlay address and name management (pure: the caller passes the set of live addresses and names)."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Container, Iterable

from meshd.dns import RESOLVER_IPV4


class IpamError(Exception):
    """The address pool is exhausted or a name is unusable."""


_LABEL_BAD = re.compile(r"[^a-z0-9-]+")

#: Names a node may not take as they are: resolvers, browsers and the host itself already give them a
#: meaning (RFC 6761 special-use names, Debian's and macOS's default hosts entries, WPAD/ISATAP proxy
#: and tunnel discovery, systemd-resolved's gateway). A node asking for one gets it with a suffix.
RESERVED_NAMES = frozenset(
    {
        "localhost", "localhost4", "localhost6", "localdomain", "local", "loopback",
        "ip6-localhost", "ip6-loopback", "ip6-localnet", "ip6-mcastprefix",
        "ip6-allnodes", "ip6-allrouters", "ip6-allhosts", "broadcasthost",
        "wpad", "isatap", "gateway", "router", "invalid", "test", "example", "onion", "home", "lan",
        "internal", "coordinator", "relay",
    }
)  # fmt: skip


def reserved_names(domain: str) -> frozenset[str]:
    """RESERVED_NAMES plus the mesh domain's own labels (``mesh`` would make ``mesh.mesh``)."""
    return RESERVED_NAMES | {label.lower() for label in domain.split(".") if label}


def random_ula48() -> str:
    """An RFC 4193 §3.2 unique local /48: fd00::/8 plus a random 40-bit global ID."""
    gid = os.urandom(5)
    net = ipaddress.IPv6Network((int.from_bytes(b"\xfd" + gid, "big") << 80, 48))
    return str(net)


def dns_label(hostname: str) -> str:
    """Reduce a hostname to one DNS-safe label (RFC 1035 §2.3.1 letters, digits, hyphen; 1-63 chars)."""
    first = hostname.strip().lower().split(".")[0]
    label = _LABEL_BAD.sub("-", first).strip("-")[:63].strip("-")
    return label or "node"


def is_dns_label(name: str) -> bool:
    return bool(re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", name))


def unique_name(base: str, taken: Container[str]) -> str:
    """`base`, or `base-1`, `base-2`, ... whichever is free first."""
    if base not in taken:
        return base
    n = 1
    while True:
        suffix = f"-{n}"
        candidate = base[: 63 - len(suffix)].rstrip("-") + suffix
        if candidate not in taken:
            return candidate
        n += 1


class AddressPool:
    """Hands out host indexes of the IPv4 prefix; IPv6 uses the same index inside the ULA /48.

    The pool remembers live indexes; `allocate` scans from a moving cursor so allocation stays O(1)
    on average, and an index is never handed out twice while it is live.
    """

    def __init__(self, prefix: str, ula48: str) -> None:
        self.v4 = ipaddress.IPv4Network(prefix)
        self.v6 = ipaddress.IPv6Network(ula48)
        self.size = self.v4.num_addresses
        self.live: set[int] = set()
        self._cursor = 1
        #: never handed out: meshd's resolver listens on 100.100.100.100 on every node's mesh interface
        #: (meshd/dns/__init__.py), inside the default prefix; a node holding it could not be reached by
        #: that address from any peer (each answers it locally) and would shadow every peer's resolver
        resolver = ipaddress.IPv4Address(RESOLVER_IPV4)
        self.reserved = {self.index_of(RESOLVER_IPV4)} if resolver in self.v4 else set()

    def index_of(self, ipv4: str) -> int:
        return int(ipaddress.IPv4Address(ipv4)) - int(self.v4.network_address)

    def mark(self, ipv4: str) -> None:
        self.live.add(self.index_of(ipv4))

    def release(self, ipv4: str) -> None:
        self.live.discard(self.index_of(ipv4))

    def allocate(self, avoid: Iterable[str] = ()) -> tuple[str, str]:
        """Reserve the next free (ipv4, ipv6) pair (network and broadcast addresses are skipped).

        `avoid`: IPv4 addresses that are free but must not be handed out (in quarantine after their node
        was removed: the cursor starts again at the lowest index after a restart, and peers' policy,
        firewall rules and hosts files may still name the old node by that address)."""
        usable = self.size - 2
        # counted without building the union: this runs per enrollment and `live` holds every node
        if len(self.live) + sum(1 for r in self.reserved if r not in self.live) >= usable:
            raise IpamError(f"address pool {self.v4} is exhausted")
        held = {self.index_of(ip) for ip in avoid} | self.reserved
        for _ in range(usable):
            idx = self._cursor
            self._cursor = idx + 1 if idx + 1 < self.size - 1 else 1
            if idx not in self.live and idx not in held:
                self.live.add(idx)
                v4 = self.v4.network_address + idx
                v6 = self.v6.network_address + idx
                return str(v4), str(v6)
        raise IpamError(
            f"address pool {self.v4} is exhausted ({len(held)} address(es) in quarantine after a removal; "
            "`coordinator nodes remove NAME --release` frees one)"
        )
