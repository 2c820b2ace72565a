"""Kernel forwarding for UDP relay ports: nftables DNAT/masquerade between the two bound addresses.

Used by region relays (coordinator) and peer relays (meshd, table ``ip meshpeerrelay``) when they run
with CAP_NET_ADMIN (and ``nft`` and ``conntrack`` exist). The relay owns one
table, ``ip meshrelay<region id>``; a leftover one is deleted at start-up, it is made when the first pair
is bound (so is ip_forward turned on, if it was off) and deleted at shutdown,
so nothing of an earlier run is left (its conntrack entries carry our ct mark and go with it)::

    prerouting (dstnat)   ip saddr A udp sport a udp dport portA  ct mark set M  dnat to B:b
                          ip saddr B udp sport b udp dport portB  ct mark set M  dnat to A:a
    postrouting (srcnat)  ct mark M ip daddr B udp dport b  masquerade to :portB
                          ct mark M ip daddr A udp dport a  masquerade to :portA
    forward (filter)      per direction a counter (byte counts for the audit and idle detection)

Conntrack keeps each flow, so after the first packet none of them reaches Python. A bind from a new
address (NAT rebinding) is a new flow that matches no rule: it reaches the relay's socket, the core
accepts it and the rules are replaced (old flows deleted). Binds within a kernel-forwarded flow are
forwarded to the peer's WireGuard port, which drops them (they are not WireGuard messages).

Forwarding to another host needs ``net.ipv4.ip_forward``: if it is off we turn it on and add a forward
rule that drops everything but our marked flows, so the relay host does not become a router.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from meshd.proto.endpoint import Endpoint
from meshd.proto.relayport import Allocation

if TYPE_CHECKING:
    from meshd.relay.forwarderthread import ForwarderThread

log = logging.getLogger("meshd.relay.ports")

MARK_BASE = 0x4D520000  #: "MR" + region id (low 16 bits): our conntrack entries
COUNTER_EVERY = 2.0  #: seconds between reads of the rule counters
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
_HANDLE = re.compile(r"# handle (\d+)\s*$")


class NftError(RuntimeError):
    """nft or conntrack failed; the text has their message."""


def _run(argv: list[str], stdin: str | None = None) -> str:
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NftError(f"{argv[0]}: {exc}") from None
    if done.returncode != 0:
        raise NftError(f"{' '.join(argv[:3])}: {done.stderr.strip()[:300]}")
    return done.stdout


@dataclass
class _Rules:
    handles: list[tuple[str, int]] = field(default_factory=list)  #: (chain, handle)
    ports: tuple[int, int] = (0, 0)
    addrs: tuple[Endpoint, Endpoint] | None = None


class NftForwarder:
    """The kernel fast path of one region's relay ports (see the module docstring)."""

    def __init__(self, region_id: int, table: str | None = None, mesh_if: str | None = None) -> None:
        self.table = table or f"meshrelay{region_id}"
        #: a peer relay's own mesh interface: forwarding to and from it (subnet routes, exit node, issue
        #: 17) is not ours to drop when we turned ip_forward on
        self.mesh_if = mesh_if
        self.mark = MARK_BASE | (region_id & 0xFFFF)
        self._rules: dict[int, _Rules] = {}  #: id(alloc) -> its rules
        self._counters: dict[int, tuple[int, int, int, int]] = {}
        self._read_at = 0.0
        self.own_forwarding = False
        self._made = False  #: the table exists (made at the first install)

    # -- life cycle -----------------------------------------------------------------------------------
    def setup(self) -> None:
        """Remove what an earlier run left (our table and marked conntrack entries). Nothing is made
        before the first pair is bound (:meth:`install`): a relay nobody uses changes no kernel state."""
        t = self.table
        _run(["nft", "-f", "-"], f"table ip {t}\ndelete table ip {t}\n")  # made if absent, then gone
        self._flush_conntrack()

    def _ensure_table(self) -> None:
        if self._made:
            return
        if IP_FORWARD.read_text().strip() != "1":
            IP_FORWARD.write_text("1\n")
            self.own_forwarding = True
            log.warning("relay ports: net.ipv4.ip_forward turned on; only relayed flows are forwarded")
        t = self.table
        _run(
            ["nft", "-f", "-"],
            f"table ip {t}\ndelete table ip {t}\n"
            f"table ip {t} {{\n"
            "  chain relaypre { type nat hook prerouting priority dstnat; policy accept; }\n"
            "  chain relaypost { type nat hook postrouting priority srcnat; policy accept; }\n"
            "  chain relayfwd { type filter hook forward priority filter; policy accept; }\n"
            "}\n",
        )
        if self.own_forwarding:
            # last in the chain (the counting rules are inserted before it): we made this host a router,
            # so it forwards our flows and nothing else
            keep = ["iifname", "!=", self.mesh_if, "oifname", "!=", self.mesh_if] if self.mesh_if else []
            _run(
                [
                    "nft",
                    "add",
                    "rule",
                    "ip",
                    t,
                    "relayfwd",
                    *keep,
                    "ct",
                    "mark",
                    "!=",
                    f"{self.mark:#x}",
                    "drop",
                ]
            )
        self._made = True

    def close(self) -> None:
        """Delete the table and our conntrack entries (the relay stops or restarts)."""
        t = self.table
        try:
            _run(["nft", "-f", "-"], f"table ip {t}\ndelete table ip {t}\n")
        except NftError as exc:
            log.warning("relay ports: %s", exc)
        self._flush_conntrack()
        self._rules.clear()
        self._made = False
        if self.own_forwarding:
            try:
                IP_FORWARD.write_text("0\n")
            except OSError as exc:
                log.warning("relay ports: cannot turn ip_forward off again: %s", exc)

    # -- allocations ----------------------------------------------------------------------------------
    def install(self, alloc: Allocation) -> None:
        """Forward between the two bound addresses (again, after a side moved)."""
        a, b = alloc.a, alloc.b
        if a.addr is None or b.addr is None:
            return
        self.remove(alloc)
        self._ensure_table()
        rules = _Rules(ports=(a.port, b.port), addrs=(a.addr, b.addr))
        self._rules[id(alloc)] = rules
        m = f"{self.mark:#x}"
        for src, dst, port_in, port_out in (
            (a.addr, b.addr, a.port, b.port),
            (b.addr, a.addr, b.port, a.port),
        ):
            rules.handles.append(
                self._add(
                    "relaypre",
                    f"ip saddr {src[0]} udp sport {src[1]} udp dport {port_in} "
                    f"ct mark set {m} dnat to {dst[0]}:{dst[1]}",
                )
            )
            rules.handles.append(
                self._add(
                    "relaypost", f"ct mark {m} ip daddr {dst[0]} udp dport {dst[1]} masquerade to :{port_out}"
                )
            )
            rules.handles.append(
                self._add(
                    "relayfwd",
                    f"ip saddr {src[0]} udp sport {src[1]} ip daddr {dst[0]} udp dport {dst[1]} "
                    "counter accept",
                    insert=True,
                )
            )
        # flows of these ports made before the rules (delivered to our sockets, or sent from them) would
        # keep going to userspace, and clash with the NAT's tuples: drop them so the next packet is NATed
        for port in (a.port, b.port):
            self._delete_flows(port)

    def remove(self, alloc: Allocation) -> None:
        rules = self._rules.pop(id(alloc), None)
        self._counters.pop(id(alloc), None)
        if rules is None:
            return
        for chain, handle in rules.handles:
            try:
                _run(["nft", "delete", "rule", "ip", self.table, chain, "handle", str(handle)])
            except NftError as exc:
                log.warning("relay ports: %s", exc)
        for port in rules.ports:
            self._delete_flows(port)

    def counters(self, alloc: Allocation) -> tuple[int, int, int, int] | None:
        """(packets, bytes) A->B then B->A forwarded by the kernel, read at most every COUNTER_EVERY s."""
        if id(alloc) not in self._rules:
            return None
        now = time.monotonic()
        if now - self._read_at >= COUNTER_EVERY:
            self._read_at = now
            try:
                self._read_counters()
            except (NftError, ValueError, KeyError) as exc:
                log.debug("relay ports: reading counters: %s", exc)
        return self._counters.get(id(alloc))

    def read_all(self) -> dict[int, tuple[int, int, int, int]]:
        """Every installed pair's counters, read now: id(alloc) -> as :meth:`counters` gives them."""
        self._read_counters()
        return dict(self._counters)

    # -- internals ------------------------------------------------------------------------------------
    def _add(self, chain: str, rule: str, insert: bool = False) -> tuple[str, int]:
        verb = "insert" if insert else "add"
        out = _run(["nft", "-e", "-a", verb, "rule", "ip", self.table, chain, *rule.split()])
        # the echo is the rule with "# handle N", then (newer nft) a "# new generation" line
        m = next((m for line in out.splitlines() if (m := _HANDLE.search(line))), None)
        if m is None:
            raise NftError(f"nft did not echo a handle for {rule!r}")
        return chain, int(m.group(1))

    def _read_counters(self) -> None:
        data = json.loads(_run(["nft", "-j", "list", "chain", "ip", self.table, "relayfwd"]))
        by_handle: dict[int, tuple[int, int]] = {}
        for item in data.get("nftables", []):
            rule = item.get("rule")
            if not rule:
                continue
            for expr in rule.get("expr", []):
                if "counter" in expr:
                    c = expr["counter"]
                    by_handle[int(rule["handle"])] = (int(c["packets"]), int(c["bytes"]))
        for key, rules in self._rules.items():
            fwd = [h for chain, h in rules.handles if chain == "relayfwd"]
            if len(fwd) == 2:
                (pa, ba), (pb, bb) = by_handle.get(fwd[0], (0, 0)), by_handle.get(fwd[1], (0, 0))
                self._counters[key] = (pa, ba, pb, bb)

    def _delete_flows(self, port: int) -> None:
        for flag in ("--orig-port-dst", "--orig-port-src"):
            with contextlib.suppress(NftError):  # "0 flow entries have been deleted" is exit status 1
                _run(["conntrack", "-D", "-p", "udp", flag, str(port)])

    def _flush_conntrack(self) -> None:
        with contextlib.suppress(NftError):  # none left: exit status 1
            _run(["conntrack", "-D", "--mark", str(self.mark)])


def kernel_forwarder(
    region_id: int, table: str | None = None, mesh_if: str | None = None
) -> ForwarderThread | None:
    """The kernel fast path when we may use it (root or CAP_NET_ADMIN, nft and conntrack), else None.
    A peer relay (meshd) passes region 0 and its own ``table``. Its installs run on a thread of their
    own (meshd.relay.forwarderthread), not on the caller's event loop."""
    from meshd.relay.forwarderthread import ForwarderThread  # it imports this module

    if os.environ.get("MESHRELAY_USERSPACE") == "1":  # the benchmark's userspace column, and for debugging
        return None
    if shutil.which("nft") is None or shutil.which("conntrack") is None:
        return None
    fw = NftForwarder(region_id, table, mesh_if)
    try:
        fw.setup()
    except (NftError, OSError) as exc:
        log.info("relay ports: forwarding in userspace (no kernel fast path: %s)", exc)
        return None
    return ForwarderThread(fw)
