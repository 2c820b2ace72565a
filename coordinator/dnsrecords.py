"""Admin-defined DNS records (issue 17): ``coordinator dns set NAME IP | dns list | dns remove NAME``.

Names for services that do not run meshd (a printer, a database behind a subnet router): every node's map
carries them (``dns`` in meshd.proto.netmap) and meshd's resolver answers ``NAME.<domain>`` with the
address (meshd/dns/zone.py), A or AAAA by the address's family. One address per name (``set`` replaces);
a name is one or more DNS labels (``printer``, ``db.prod``). A name a node holds is refused (409), and a
node never takes a record's name: enrollment gives it a suffix (``printer-1``, coordinator/nodes.py
``_held_names``) and an admin rename onto it is refused (issue 12: nodes choose their own names, records
are the admin's word). Both checks run in the serialised write transaction (on PostgreSQL under the
cluster-wide lock), so they cannot race; should a map carry both anyway (a database written by an older
version), the record wins: meshd's resolver answers it and the hosts block leaves the node out
(meshd/dns/zone.py, meshd/hosts.py ``peer_entries``). Every change is audited and published to every node
as a map-wide change (kind ``dns``), like the relay map.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from coordinator.core import Core, Tx
from coordinator.db.models import DnsRecord, Node
from coordinator.errors import BadRequest, Conflict, NotFound
from coordinator.ipam import is_dns_label

MAX_NAME = 200
MAX_RECORDS = 1024  #: what a map may carry (meshd.proto.netmap.MAX_DNS_RECORDS)


@dataclass(frozen=True, slots=True)
class Record:
    name: str
    ip: str
    created_at: float


def check_name(name: str) -> str:
    """The record's name in canonical form (lower case, no trailing dot); BadRequest when unusable."""
    clean = name.strip().lower().rstrip(".")
    if not clean or len(clean) > MAX_NAME or not all(is_dns_label(label) for label in clean.split(".")):
        raise BadRequest(
            f"bad DNS name {name[:80]!r}: DNS labels (a-z, 0-9, '-') joined by dots, at most {MAX_NAME} chars"
        )
    return clean


def check_ip(ip: str) -> str:
    try:
        return str(ipaddress.ip_address(ip.strip()))
    except ValueError:
        raise BadRequest(f"bad IP address {ip[:80]!r}") from None


async def load(s: AsyncSession) -> tuple[tuple[str, str], ...]:
    """Every record as (name, ip), sorted by name: what the maps carry."""
    rows = (await s.execute(select(DnsRecord.name, DnsRecord.ip).order_by(DnsRecord.name))).all()
    return tuple((name, ip) for name, ip in rows)


async def list_records(core: Core) -> list[Record]:
    async with core.read() as s:
        rows = (await s.execute(select(DnsRecord).order_by(DnsRecord.name))).scalars().all()
    return [Record(r.name, r.ip, r.created_at) for r in rows]


async def set_record(core: Core, name: str, ip: str, actor: str) -> Record:
    clean, addr = check_name(name), check_ip(ip)
    async with core.transaction() as tx:
        s = tx.session
        if (await s.execute(select(Node.id).where(Node.name == clean))).first() is not None:
            raise Conflict(f"{clean!r} is a node's name: the resolver answers it with the node's addresses")
        row = (await s.execute(select(DnsRecord).where(DnsRecord.name == clean))).scalar_one_or_none()
        old = row.ip if row is not None else None
        if row is None:
            if len(await load(s)) >= MAX_RECORDS:
                raise Conflict(f"at most {MAX_RECORDS} DNS records; remove one first")
            row = DnsRecord(name=clean, ip=addr, created_at=time.time())
            s.add(row)
        elif old == addr:
            return Record(row.name, row.ip, row.created_at)
        row.ip = addr
        await s.flush()
        await tx.audit(actor, "dns.set", f"dns:{clean}", {"ip": addr, "previous": old})
        await _publish(tx)
    return Record(row.name, row.ip, row.created_at)


async def remove_record(core: Core, name: str, actor: str) -> None:
    clean = check_name(name)
    async with core.transaction() as tx:
        row = (
            await tx.session.execute(select(DnsRecord).where(DnsRecord.name == clean))
        ).scalar_one_or_none()
        if row is None:
            raise NotFound(f"no DNS record {clean!r}")
        await tx.session.delete(row)
        await tx.session.flush()
        await tx.audit(actor, "dns.removed", f"dns:{clean}", {"ip": row.ip})
        await _publish(tx)


async def _publish(tx: Tx) -> None:
    """Every node's map gets the new record set (a map-wide change, like the relay map)."""
    records = await load(tx.session)
    tx.change("dns")
    core = tx.core

    def commit() -> None:
        core.state.dns_records = records

    tx.on_commit(commit)
