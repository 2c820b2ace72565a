"""Subnet routes and exit nodes: what nodes advertise, what the admin approved (issue 17).

A node advertises prefixes (``meshd up --advertise-routes``, ``--advertise-exit-node`` = 0.0.0.0/0 and
::/0) at every start; the admin approves or removes them (``coordinator routes ...``, audited). A prefix
that is both advertised and approved goes into the node's map entry (``Peer.routes``), where peers find
it; the policy decides who may use it (coordinator/policy.py: ``dst = ["10.1.0.0/24:*"]``), and the
router's firewall enforces that (meshd/firewall.py, rules with ``dst``). Several routers may carry the
same prefix: every node picks the same primary (meshd/routing.py: the lowest node id that is online).

An approval outlives a withdrawn advertisement: a router that restarts without a prefix and later
advertises it again needs no new approval. ``routes remove`` deletes the approval (and the row when the
node no longer advertises it either).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from coordinator.core import Core, Tx
from coordinator.db.models import Node, Route
from coordinator.errors import BadRequest, NotFound
from coordinator.nodes import by_name
from meshd.routing import EXIT_PREFIXES, MAX_ADVERTISED, canonical_prefix, primaries


@dataclass(frozen=True, slots=True)
class RouteInfo:
    node: str
    node_id: int
    prefix: str
    advertised: bool
    approved: bool
    primary: bool  #: the node peers route this prefix through now (meshd/routing.py's rule)


def parse_prefixes(items: list[str]) -> list[str]:
    """Canonical prefixes from the admin's or a node's text; ``exit`` means 0.0.0.0/0 and ::/0."""
    out: list[str] = []
    for item in items:
        if item == "exit":
            out.extend(EXIT_PREFIXES)
            continue
        try:
            out.append(canonical_prefix(item))
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
    return list(dict.fromkeys(out))


def _effective(rows: list[Route]) -> tuple[str, ...]:
    nets = [ipaddress.ip_network(r.prefix) for r in rows if r.advertised and r.approved]
    return tuple(str(n) for n in sorted(nets, key=lambda n: (n.version, n)))


async def load(session: AsyncSession, node_ids: set[int] | None = None) -> dict[int, tuple[str, ...]]:
    """node id -> the prefixes it routes (advertised and approved), for MapState.routes."""
    query = select(Route)
    if node_ids is not None:
        query = query.where(Route.node_id.in_(node_ids))
    by_node: dict[int, list[Route]] = {}
    for row in (await session.execute(query)).scalars().all():
        by_node.setdefault(row.node_id, []).append(row)
    return {i: eff for i, rows in by_node.items() if (eff := _effective(rows))}


async def _rows(tx: Tx, node_id: int) -> list[Route]:
    return list((await tx.session.execute(select(Route).where(Route.node_id == node_id))).scalars().all())


async def _publish(tx: Tx, node_id: int, rows: list[Route]) -> None:
    """After a change of `rows`: a map change when what the node routes differs from before."""
    await tx.session.flush()
    new = _effective(rows)  # a deleted row is neither advertised nor approved: never in the result
    state = tx.core.state
    if new != state.routes.get(node_id, ()):
        tx.change("changed", node_id)
        tx.on_commit(lambda: state.set_routes(node_id, new))


async def advertise(core: Core, node_id: int, prefixes: list[str]) -> tuple[str, ...]:
    """The node's full list of advertised prefixes (replaces the previous one); returns the approved ones."""
    if len(prefixes) > MAX_ADVERTISED:
        raise BadRequest(f"at most {MAX_ADVERTISED} routes")
    wanted = parse_prefixes(prefixes)
    async with core.transaction() as tx:
        node = await tx.session.get(Node, node_id)
        if node is None:
            raise NotFound("unknown node")
        rows = await _rows(tx, node_id)
        have = {r.prefix: r for r in rows}
        before = sorted(p for p, r in have.items() if r.advertised)
        for prefix, row in have.items():
            row.advertised = prefix in wanted
            if not row.advertised and not row.approved:
                await tx.session.delete(row)
        for prefix in wanted:
            if prefix not in have:
                row = Route(node_id=node_id, prefix=prefix, advertised=True, approved=False)
                tx.session.add(row)
                rows.append(row)
        if sorted(wanted) != before:
            await tx.audit(
                f"node:{node.name}",
                "routes.advertised",
                f"node:{node.name}",
                {"node_id": node_id, "routes": wanted},
            )
        await _publish(tx, node_id, rows)
        return tuple(r.prefix for r in rows if r.advertised and r.approved)


async def approve(core: Core, name: str, prefix: str, actor: str) -> list[str]:
    """Approve `prefix` (or ``exit``) for node `name`; it takes effect once the node advertises it."""
    chosen = parse_prefixes([prefix])
    async with core.transaction() as tx:
        node = await by_name(tx, name, live=True)
        rows = await _rows(tx, node.id)
        have = {r.prefix: r for r in rows}
        for p in chosen:
            if p in have:
                have[p].approved = True
            else:
                row = Route(node_id=node.id, prefix=p, advertised=False, approved=True)
                tx.session.add(row)
                rows.append(row)
        await tx.audit(actor, "routes.approved", f"node:{name}", {"node_id": node.id, "routes": chosen})
        await _publish(tx, node.id, rows)
    return chosen


async def remove(core: Core, name: str, prefix: str, actor: str) -> list[str]:
    """Withdraw the approval of `prefix` (or ``exit``) for node `name`: peers stop routing it at once."""
    chosen = parse_prefixes([prefix])
    async with core.transaction() as tx:
        node = await by_name(tx, name, live=True)
        rows = await _rows(tx, node.id)
        have = {r.prefix: r for r in rows}
        if not any(p in have and have[p].approved for p in chosen):
            raise NotFound(f"node {name!r} has no approved route {prefix!r}")
        for p in chosen:
            row = have.get(p)
            if row is None:
                continue
            row.approved = False
            if not row.advertised:
                await tx.session.delete(row)
        await tx.audit(actor, "routes.removed", f"node:{name}", {"node_id": node.id, "routes": chosen})
        await _publish(tx, node.id, rows)
    return chosen


async def list_routes(core: Core) -> list[RouteInfo]:
    async with core.read() as s:
        found = (await s.execute(select(Route, Node.name).join(Node, Node.id == Route.node_id))).all()
    state = core.state
    carriers = {i: (p.routes, p.online) for i, p in state.peers.items() if p.routes}
    chosen = primaries(carriers)
    out = [
        RouteInfo(name, r.node_id, r.prefix, r.advertised, r.approved, chosen.get(r.prefix) == r.node_id)
        for r, name in found
    ]
    return sorted(out, key=lambda x: (x.node, ipaddress.ip_network(x.prefix).version, x.prefix))
