"""Which peer carries which routed prefix (subnet routers, exit nodes; issue 17). Pure functions.

Peers' map entries list the prefixes the admin approved for them (``Peer.routes``). Several routers may
carry the same prefix (high availability): every node picks the same *primary* for it, the carrier with
the lowest node id among those the map shows online (all of them when none is), so a router that goes
offline hands its prefixes to the next one as soon as the coordinator says so, and gets them back when it
returns. WireGuard allows one peer per allowed IP, so only the primary gets the prefix in its AllowedIPs
(meshd.peerset.wg_peers), and the WireGuard backend adds the route on the mesh interface for it.

The default routes (0.0.0.0/0, ::/0: an exit node) are used only towards the exit node this host chose
(``meshd up --exit-node NAME``, ``meshd set --exit-node``); they never get a plain route (they would take
the underlay with them): meshd.exitnode routes them by policy routing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

EXIT_PREFIXES = ("0.0.0.0/0", "::/0")
MAX_ADVERTISED = 64  #: prefixes one node may advertise


def canonical_prefix(text: str) -> str:
    """``10.1.0.0/24`` as written (no host bits); ValueError with a one-line reason otherwise."""
    try:
        net = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError:
        raise ValueError(f"bad route {text[:64]!r}: write a network such as 10.1.0.0/24") from None
    return str(net)


def parse_advertised(text: str) -> tuple[str, ...]:
    """The ``--advertise-routes`` value: comma-separated CIDRs (empty: none)."""
    items = [t for t in (p.strip() for p in text.split(",")) if t]
    if len(items) > MAX_ADVERTISED:
        raise ValueError(f"at most {MAX_ADVERTISED} routes")
    out = []
    for item in items:
        prefix = canonical_prefix(item)
        if prefix in EXIT_PREFIXES:
            raise ValueError(f"{prefix} is an exit route: use --advertise-exit-node")
        out.append(prefix)
    return tuple(dict.fromkeys(out))


def is_exit(prefix: str) -> bool:
    return prefix in EXIT_PREFIXES


def primaries(carriers: Mapping[int, tuple[Iterable[str], bool]]) -> dict[str, int]:
    """prefix -> the node id that carries it now, from node id -> (its prefixes, online)."""
    best: dict[str, tuple[bool, int]] = {}
    for node_id, (prefixes, online) in carriers.items():
        for prefix in prefixes:
            key = (not online, node_id)  # online first, then the lowest id
            if prefix not in best or key < best[prefix]:
                best[prefix] = key
    return {prefix: node_id for prefix, (_, node_id) in best.items()}


def chosen_routes(
    carriers: Mapping[int, tuple[Iterable[str], bool]],
    own: Iterable[str] = (),
    exit_node: int | None = None,
) -> dict[int, tuple[str, ...]]:
    """node id -> the prefixes this host routes through it.

    `own`: prefixes this host routes itself (it is on that network: never through a peer). `exit_node`:
    the chosen exit node's id; the default routes go to it only, whichever node is primary for them."""
    mine = set(own)
    out: dict[int, list[str]] = {}
    subnets = {i: ([p for p in ps if not is_exit(p)], on) for i, (ps, on) in carriers.items()}
    for prefix, node_id in primaries(subnets).items():
        if prefix not in mine:
            out.setdefault(node_id, []).append(prefix)
    if exit_node is not None and exit_node in carriers:
        exits = [p for p in carriers[exit_node][0] if is_exit(p)]
        if exits:
            out.setdefault(exit_node, []).extend(exits)
    return {i: tuple(sorted(ps, key=_order)) for i, ps in out.items()}


def _order(prefix: str) -> tuple[int, ipaddress.IPv4Network | ipaddress.IPv6Network]:
    net = ipaddress.ip_network(prefix)
    return (net.version, net)
