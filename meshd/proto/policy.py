"""Inbound filter rules the coordinator compiles for one node and ships in its network map.

Each rule says "packets from these source networks, of this protocol, to these destination ports of
mine, may enter". meshd turns the list into nftables rules on its mesh interface (meshd/firewall.py).
Replies to connections the node opened itself always pass (stateful); everything else is dropped.
:data:`ALLOW_ALL` (one rule: any source, any protocol) is what a node gets when no policy is set.

JSON form: ``{"src": ["100.64.0.1/32", ...], "proto": "tcp"|"udp"|"icmp"|"any", "ports": [[22, 22], ...]}``
(``ports`` empty = every port), plus ``"dst": ["10.1.0.0/24", ...]`` on a rule for traffic this node
routes (subnet router or exit node, issue 17): without ``dst`` a rule covers this host's own addresses.
The codec is strict: anything malformed raises :class:`RuleError`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

PROTOCOLS = ("tcp", "udp", "icmp", "any")
MAX_RULES = 4096
MAX_SOURCES = 65536


class RuleError(ValueError):
    """An inbound rule in a map is malformed."""


@dataclass(frozen=True, slots=True)
class InboundRule:
    """Traffic from `sources` (CIDRs) using `proto` to `ports` (inclusive ranges; () = all) may enter."""

    sources: tuple[str, ...]
    proto: str = "any"
    ports: tuple[tuple[int, int], ...] = ()
    dst: tuple[str, ...] = ()  #: routed destinations (CIDRs); () = this host itself


ALLOW_ALL: tuple[InboundRule, ...] = (InboundRule(("0.0.0.0/0", "::/0"), "any", ()),)


def rule_to_json(rule: InboundRule) -> dict[str, Any]:
    out: dict[str, Any] = {
        "src": list(rule.sources),
        "proto": rule.proto,
        "ports": [list(p) for p in rule.ports],
    }
    if rule.dst:
        out["dst"] = list(rule.dst)
    return out


def rules_to_json(rules: tuple[InboundRule, ...]) -> list[dict[str, Any]]:
    return [rule_to_json(r) for r in rules]


def _port(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
        raise RuleError(f"inbound rule: bad port {value!r}")
    return value


def _cidrs(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or len(value) > MAX_SOURCES or not all(isinstance(s, str) for s in value):
        raise RuleError(f"inbound rule: {what} must be a list of CIDR strings")
    out = []
    for s in value:
        try:
            out.append(str(ipaddress.ip_network(s, strict=False)))
        except ValueError:
            raise RuleError(f"inbound rule: bad {what} {s[:64]!r}") from None
    return out


def rule_from_json(raw: Any) -> InboundRule:
    if not isinstance(raw, dict):
        raise RuleError("inbound rule: expected an object")
    src, proto, ports = raw.get("src"), raw.get("proto"), raw.get("ports", [])
    sources = _cidrs(src, "src")
    dst = _cidrs(raw.get("dst", []), "dst")
    if proto not in PROTOCOLS:
        raise RuleError(f"inbound rule: proto must be one of {', '.join(PROTOCOLS)}")
    if not isinstance(ports, list) or len(ports) > 1024:
        raise RuleError("inbound rule: ports must be a list of [first, last] pairs")
    ranges = []
    for p in ports:
        if not isinstance(p, list) or len(p) != 2:
            raise RuleError("inbound rule: ports must be a list of [first, last] pairs")
        first, last = _port(p[0]), _port(p[1])
        if first > last:
            raise RuleError(f"inbound rule: empty port range {first}-{last}")
        ranges.append((first, last))
    return InboundRule(tuple(sources), proto, tuple(ranges), tuple(dst))


def rules_from_json(raw: Any) -> tuple[InboundRule, ...]:
    if not isinstance(raw, list) or len(raw) > MAX_RULES:
        raise RuleError(f"inbound rules must be a list of at most {MAX_RULES} rules")
    return tuple(rule_from_json(r) for r in raw)


def allows_everything(rules: tuple[InboundRule, ...]) -> bool:
    """True when the rules let any packet in (no filter needs to be installed)."""
    return any(
        r.proto == "any" and not r.ports and not r.dst and {"0.0.0.0/0", "::/0"} <= set(r.sources)
        for r in rules
    )
