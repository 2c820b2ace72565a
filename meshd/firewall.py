"""Enforce the coordinator's inbound rules on the mesh interface with nftables (policy layer 2).

meshd owns one table per interface, ``inet meshd_<ifname>``, so two daemons on a host never touch each
other's rules. Its one chain hooks ``prerouting`` at priority ``dstnat - 10`` (-110) and only looks at
packets arriving on the mesh interface. Why there and not at ``input``:

- every packet that arrives on the interface passes prerouting, whatever routing decides next: delivered
  here (``input``), forwarded to another interface (``forward``), or rewritten by a DNAT first (a
  container's ``-p 8080:80`` turns a packet for our mesh address into one for a bridge address, which
  then takes the ``forward`` path and never meets an ``input`` chain);
- running before DNAT (priority -100) means the rules see the address and port the peer sent to, the
  ones the policy names (``node:b:8080``), not whatever a local NAT rewrites them to; no ``ct original``
  matching is needed;
- conntrack has already run (priority -200), so the stateful matches below work as they did at input.

- replies to connections this host opened (``ct direction reply``) and related ICMP errors pass;
- every packet of a connection someone else opened is checked against the rules, each time, so a removed
  permission stops an established flow at once (no conntrack flush needed);
- everything else is dropped.

While this node routes for others (subnet router, exit node; issue 17) a rule without ``dst`` covers this
host's own addresses only (``fib daddr type local``, looked up before DNAT, so the address the peer sent
to), and a rule with ``dst`` covers packets we forward to those prefixes for the sender: a permission for
this host never opens the networks it routes.

The table is replaced in one ``nft -f`` transaction (never flushed rule by rule), deleted when no policy is
set (the map's rules allow everything), on ``meshd down`` and by crash clean-up (meshd/runtime.py).
:func:`render` is pure and tested on its own; :class:`Firewall` runs ``nft``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import subprocess
import threading

from meshd.proto.policy import InboundRule, allows_everything

log = logging.getLogger("meshd.firewall")

NFT = "nft"
NFT_TIMEOUT = 10.0  #: seconds for one nft run while running
CLOSE_TIMEOUT = 1.0  #: seconds for removing the table on the way out (a stop must end within 5 s)


class FirewallError(RuntimeError):
    """nft refused the rules or is missing."""


_IFNAME_OK = re.compile(r"[A-Za-z0-9_.=+-]{1,15}")  #: a Linux interface name (meshd.wg.model's rule)
_PROTOS = frozenset({"tcp", "udp", "icmp", "any"})


def table_name(ifname: str) -> str:
    """``meshd_<ifname>`` with anything nft would not accept in a name replaced by ``_``."""
    return "meshd_" + re.sub(r"[^A-Za-z0-9_]", "_", ifname)


def _net(source: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    # only plain CIDRs reach the script: ipaddress keeps an IPv6 zone id ("fe80::%x\n.../64") verbatim,
    # and any newline in the nft text would be a statement of its own
    if not isinstance(source, str) or "%" in source or not source.isascii() or not source.isprintable():
        raise FirewallError(f"inbound rule source {source!r} is not a plain CIDR")
    try:
        return ipaddress.ip_network(source, strict=False)
    except ValueError:
        raise FirewallError(f"inbound rule source {source!r} is not a CIDR") from None


def _nets(sources: tuple[str, ...], version: int) -> list[str]:
    nets = [n for n in (_net(s) for s in sources) if n.version == version]
    return [str(n) for n in ipaddress.collapse_addresses(nets)]  # type: ignore[type-var]


def _port(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
        raise FirewallError(f"inbound rule port {value!r} is not in 0..65535")
    return value


def _ports(ports: tuple[tuple[int, int], ...]) -> str:
    ranges = [(_port(lo), _port(hi)) for lo, hi in ports]
    items = ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges)
    return f"{{ {items} }}"


def rule_lines(rule: InboundRule, local_only: bool = False) -> list[str]:
    """nft statements (accepting) for one inbound rule; `local_only`: a rule without ``dst`` matches
    packets for this host's own addresses only (set while this node routes for others)."""
    out = []
    for family, version, icmp in (("ip", 4, "icmp"), ("ip6", 6, "ipv6-icmp")):
        nets = _nets(rule.sources, version)
        if not nets:
            continue
        match = f"{family} saddr {{ {', '.join(nets)} }}"
        if rule.dst:  # traffic we route for the sender (subnet router, exit node; issue 17)
            dsts = _nets(rule.dst, version)
            if not dsts:
                continue
            match += f" {family} daddr {{ {', '.join(dsts)} }}"
        elif local_only:  # this host itself: a rule for us must not open what we forward (issue 17)
            match += " fib daddr type local"
        if rule.proto == "icmp":
            out.append(f"{match} meta l4proto {icmp} accept")
        elif rule.proto in ("tcp", "udp"):
            ports = f" {rule.proto} dport {_ports(rule.ports)}" if rule.ports else ""
            out.append(f"{match} meta l4proto {rule.proto}{ports} accept")
        elif rule.ports:  # any protocol, some ports: tcp and udp on those ports
            out.extend(f"{match} {p} dport {_ports(rule.ports)} accept" for p in ("tcp", "udp"))
        else:
            out.append(f"{match} accept")
    return out


def render(ifname: str, rules: tuple[InboundRule, ...], local_only: bool = False) -> str:
    """The nft script that atomically (re)creates the table for `ifname` enforcing `rules`.

    FirewallError for anything that is not a canonical interface name, CIDR, protocol or port: only
    those reach the script (it is line-based text, like UAPI)."""
    if not _IFNAME_OK.fullmatch(ifname):
        raise FirewallError(f"interface name {ifname!r} is not valid")
    if any(rule.proto not in _PROTOS for rule in rules):
        raise FirewallError("inbound rule protocol is not one of tcp, udp, icmp, any")
    table = table_name(ifname)
    body = [
        f'iifname != "{ifname}" accept',
        "ct direction reply accept",
        "ct state related accept",
    ]
    for rule in rules:
        body.extend(rule_lines(rule, local_only or any(r.dst for r in rules)))
    body.append("counter drop")
    lines = [
        f"table inet {table}",
        f"delete table inet {table}",
        f"table inet {table} {{",
        # before DNAT (dstnat = -100) and before routing: input, forward and DNAT'ed paths all pass here
        "\tchain prerouting {",
        "\t\ttype filter hook prerouting priority dstnat - 10; policy accept;",
        *(f"\t\t{line}" for line in body),
        "\t}",
        "}",
    ]
    return "\n".join(lines) + "\n"


def remove_script(ifname: str) -> str:
    table = table_name(ifname)
    return f"table inet {table}\ndelete table inet {table}\n"


def run_nft(script: str, timeout: float = NFT_TIMEOUT) -> None:
    """Run an nft batch (blocking); FirewallError with nft's first error line on failure."""
    try:
        done = subprocess.run([NFT, "-f", "-"], input=script, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FirewallError(f"cannot run nft: {exc}") from None
    if done.returncode != 0:
        first = next((line for line in done.stderr.splitlines() if line.strip()), "unknown error")
        raise FirewallError(f"nft: {first}")


def remove_table(ifname: str, timeout: float = NFT_TIMEOUT) -> None:
    """Delete meshd's table for `ifname` if it exists (crash clean-up; never raises)."""
    try:
        run_nft(remove_script(ifname), timeout)
    except FirewallError as exc:
        log.debug("removing firewall table: %s", exc)


class Firewall:
    """The installed rules of one mesh interface; `update` only runs nft when the rules changed.

    `close` always removes the table, even when no update finished: an update cancelled by the daemon's
    stop leaves its nft run going in its thread, and that run may create the table after the stop looked.
    So every nft run holds one thread lock, and a run that starts after `close` began installs nothing:
    whatever order the threads get the lock in, the removal is the last word.
    """

    def __init__(self, ifname: str) -> None:
        self.ifname = ifname
        self.rules: tuple[InboundRule, ...] | None = None  #: None: no table installed
        self.local_only = False  #: this node forwards for peers (meshd/router.py): see rule_lines
        self._lock = asyncio.Lock()
        self._nft_lock = threading.Lock()
        self._closed = False
        self._installed_local_only = False

    def _install(self, script: str) -> None:  # in a worker thread
        with self._nft_lock:
            if self._closed:
                raise FirewallError("closed")
            run_nft(script)

    @property
    def active(self) -> bool:
        return self.rules is not None

    async def update(self, rules: tuple[InboundRule, ...]) -> None:
        async with self._lock:
            if allows_everything(rules):
                if self.rules is not None:
                    await asyncio.to_thread(self._install, remove_script(self.ifname))
                    self.rules = None
                    log.info("firewall: no policy, table removed")
                return
            local_only = self.local_only
            if rules == self.rules and local_only == self._installed_local_only:
                return
            await asyncio.to_thread(self._install, render(self.ifname, rules, local_only))
            self.rules, self._installed_local_only = rules, local_only
            log.info("firewall: %d inbound rule(s) on %s", len(rules), self.ifname)

    async def close(self) -> None:
        """Remove the table (whether or not we think it is there). Bounded: about CLOSE_TIMEOUT s."""
        self._closed = True  # read by _install under the thread lock: no table after this point

        def remove() -> None:
            with self._nft_lock:
                remove_table(self.ifname, CLOSE_TIMEOUT)

        try:
            # not under self._lock: an update in flight must not delay the stop (the thread lock orders them)
            async with asyncio.timeout(CLOSE_TIMEOUT + 0.2):
                await asyncio.to_thread(remove)
        except TimeoutError:
            log.warning("firewall: removing table %s took too long", table_name(self.ifname))
        self.rules = None
