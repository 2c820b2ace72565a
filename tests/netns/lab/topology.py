"""The lab: an isolated "internet" of network namespaces with routers, hosts and public servers.

Addressing (all inside the lab's namespaces; nothing is routed to the machine's real network)::

    inet      core namespace, bridge inet0 6.0.0.1/7 (6.0.0.0/7 = 6.x and 7.x are one on-link segment),
              no default route: anything not in the lab is unreachable
    routers   wan0 6.0.0.<n>/7 (carrier NATs too), default via 6.0.0.1; LAN bridge lan0 192.168.<k>.1/24
    hosts     eth0 192.168.<k>.<10+j>/24 behind router k, default via 192.168.<k>.1
    public    eth0 7.0.0.<n>/7 (servers and nat="public" hosts), default via 6.0.0.1
    cgnat     the home router's wan0 is 100.64.<c>.<2+j>/24 on carrier c's lan0 (100.64.<c>.1/24)

Public-looking 6/8 and 7/8 are used because miniupnpd refuses private or reserved WAN addresses.

IPv6 (issue 15, only for nodes made with ``ipv6=``; a lab without them has no IPv6 address at all) uses
the documentation prefix 2001:db8::/32, routed without NAT::

    inet      inet0 2001:db8::1/64, forwarding; a route to each dual-stack router's LAN prefix
    routers   wan0 2001:db8::6:<n>/64; lan0 2001:db8:<k>::1/64 (k in hex); a stateful IPv6 firewall
              (nat.ruleset6: new inbound dropped, established/related allowed)
    hosts     eth0 2001:db8:<k>::<10+j>/64 (``ipv6="only"``: no IPv4 address or route at all)
    public    eth0 2001:db8::7:<n>/64
    cgnat     the carrier routes IPv6 (no NAT, no firewall): its lan0 is 2001:db8:100:<c>::1/64, the home
              router's wan0 2001:db8:100:<c>::<2+j>/64
Interface names are fixed per namespace (eth0, wan0, lan0, inet0, veth ports p<j>/r<k>/s<n>), so they never
collide across namespaces or runs; the namespaces themselves carry the run-unique owner tag.
"""

from __future__ import annotations

import atexit
import ipaddress
import re
import secrets
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from tests.netns.lab import nat as rules
from tests.netns.lab.nat import LAN, WAN, NatKind, parse_kind
from tests.netns.lab.netns import PREFIX, LabError, Namespace, OwnerLock, new_owner, sweep_stale

ECHO_SCRIPT = Path(__file__).with_name("echo.py")
DELAY_SCRIPT = Path(__file__).with_name("delay.py")
WATCHDOG_SCRIPT = Path(__file__).with_name("watchdog.py")
INET_BRIDGE = "inet0"
INET_GW = "6.0.0.1"
INET_PREFIXLEN = 7
INET_GW6 = "2001:db8::1"
ECHO_PORT = 4000
SENTINEL = "lab-sentinel"
PCP_MIN_LIFETIME = 2  #: seconds; see Lab.router
_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,19}$")


def _wait_ready(proc: subprocess.Popen[bytes], what: str, timeout: float) -> None:
    """Wait until ``proc`` prints a line ``ready`` on stdout (bounded)."""
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while (left := deadline - time.monotonic()) > 0:
            if not sel.select(left):
                break
            line = proc.stdout.readline()
            if not line:
                raise LabError(f"{what} exited before it was ready (exit {proc.wait(1)})")
            if line.strip() == b"ready":
                return
        raise LabError(f"{what} not ready within {timeout} s")
    finally:
        sel.close()


class Node:
    """Something with a namespace: commands run inside it."""

    def __init__(self, lab: Lab, name: str, netns: Namespace) -> None:
        self.lab = lab
        self.name = name
        self.netns = netns

    @property
    def ns(self) -> str:
        """The namespace name (for ``ip netns exec``)."""
        return self.netns.name

    def run(
        self, cmd: Sequence[str], *, check: bool = False, timeout: float = 30.0, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the namespace to completion (output captured as text)."""
        return self.netns.run(cmd, check=check, timeout=timeout, input=input)

    def popen(
        self,
        cmd: Sequence[str],
        *,
        stdout: int | IO[bytes] | None = subprocess.DEVNULL,
        stderr: int | IO[bytes] | None = subprocess.DEVNULL,
        stdin: int | IO[bytes] | None = subprocess.DEVNULL,
    ) -> subprocess.Popen[bytes]:
        """Start a long-running process inside the namespace; the lab kills it at teardown."""
        return self.netns.popen(cmd, stdout=stdout, stderr=stderr, stdin=stdin)

    def python(self, code: str, *args: str, timeout: float = 30.0, check: bool = True) -> str:
        """Run Python ``code`` inside the namespace; return its stdout."""
        return self.netns.python(code, *args, timeout=timeout, check=check).stdout

    def echo(
        self, *args: str, timeout: float = 10.0, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run the lab's ``echo.py`` tool (see its docstring) inside the namespace."""
        return self.netns.run([_python(), str(ECHO_SCRIPT), *args], timeout=timeout, check=check)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} ns={self.ns}>"


def _python() -> str:
    return sys.executable


class UdpListener:
    """A bounded ``echo.py listen`` running in a host: did one datagram reach it, and from where?"""

    def __init__(self, proc: subprocess.Popen[bytes], what: str) -> None:
        self._proc = proc
        self.mapped: str | None = None  #: "ip:port" the punch target observed (with punch=)
        assert proc.stdout is not None
        while True:  # read up to "ready" (the process itself bounds every wait)
            line = proc.stdout.readline().decode().strip()
            if line == "ready":
                return
            if line.startswith("mapped "):
                self.mapped = None if line == "mapped -" else line.removeprefix("mapped ")
                continue
            raise LabError(f"{what}: unexpected output {line!r} (exit {proc.poll()})")

    def result(self, timeout: float = 10.0) -> str | None:
        """``"ip:port payload"`` of the datagram received, or None if none came before its timeout."""
        out, _ = self._proc.communicate(timeout=timeout)
        line = out.decode().strip()
        return None if line in ("timeout", "") else line


class Router(Node):
    """A NAT router (or a carrier NAT): ``wan0`` towards the internet, bridge ``lan0`` towards its hosts."""

    def __init__(
        self,
        lab: Lab,
        name: str,
        netns: Namespace,
        kind: NatKind,
        *,
        index: int,
        wan_ip: str,
        lan_net: ipaddress.IPv4Network,
        upstream: Router | None,
        wan_ip6: str | None = None,
        lan_net6: ipaddress.IPv6Network | None = None,
    ) -> None:
        super().__init__(lab, name, netns)
        self.kind = kind
        self.wan_ip6 = wan_ip6  #: its IPv6 WAN address (None: an IPv4-only router)
        self.lan_net6 = lan_net6  #: the IPv6 prefix routed to its LAN
        self.index = index
        self.wan_ip = wan_ip  #: this router's own WAN address (100.64.x.y for a cgnat home router)
        self.lan_net = lan_net
        self.lan_ip = str(lan_net.network_address + 1)  #: the LAN gateway address
        self.upstream = upstream  #: the carrier NAT in front of a cgnat home router
        self.hosts: list[Host] = []
        self.miniupnpd: subprocess.Popen[bytes] | None = None
        self._ports = 0

    @property
    def public_ip(self) -> str:
        """The address the internet sees for this router's hosts (the carrier's for cgnat)."""
        return self.upstream.public_ip if self.upstream is not None else self.wan_ip

    def _next_port(self) -> str:
        self._ports += 1
        return f"p{self._ports}"

    def conntrack(self) -> str:
        """``conntrack -L`` in the router namespace (for debugging and assertions)."""
        return self.run(["conntrack", "-L"], timeout=10).stdout

    def nft(self) -> str:
        """``nft list ruleset`` in the router namespace."""
        return self.run(["nft", "list", "ruleset"], timeout=10).stdout

    def miniupnpd_log(self) -> str:
        """What miniupnpd logged so far ("" for other kinds)."""
        path = self.lab.tmpdir / f"{self.name}-miniupnpd.log"
        return path.read_text(errors="replace") if path.exists() else ""


class Host(Node):
    """A machine: behind ``router`` on its LAN, or (``router is None``) directly on the internet."""

    def __init__(
        self, lab: Lab, name: str, netns: Namespace, ip: str, router: Router | None, ip6: str | None = None
    ) -> None:
        super().__init__(lab, name, netns)
        self.ip = ip  #: its own address (LAN address behind a router; its IPv6 address if IPv6-only)
        self.router = router
        self.ip6 = ip6  #: its global IPv6 address (None: IPv4 only); no NAT, so peers see this one

    @property
    def public_ip(self) -> str:
        """The address servers see when this host talks to them."""
        return self.router.public_ip if self.router is not None else self.ip

    def start_echo(
        self, udp: int | None = ECHO_PORT, tcp: int | None = None, tcp6: int | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``echo.py serve`` here (replies with the observed source ip:port); waits until it listens.
        ``tcp6``: a TCP port on IPv6 too (its own listener)."""
        args = [_python(), str(ECHO_SCRIPT), "serve"]
        if udp is not None:
            args += ["--udp", str(udp)]
        if tcp is not None:
            args += ["--tcp", str(tcp)]
        if tcp6 is not None:
            args += ["--tcp6", str(tcp6)]
        proc = self.popen(args, stdout=subprocess.PIPE)
        _wait_ready(proc, f"echo server on {self.name}", 10.0)
        return proc

    def listen_udp(self, port: int, *, timeout: float = 1.0, punch: str | None = None) -> UdpListener:
        """Listen for one datagram on UDP ``port`` for ``timeout`` s (after punching ``punch``, an echo
        server "ip:port", from the same port). Returns once it is listening."""
        args = [_python(), str(ECHO_SCRIPT), "listen", "--port", str(port), "--timeout", str(timeout)]
        if punch is not None:
            args += ["--punch", punch]
        return UdpListener(self.popen(args, stdout=subprocess.PIPE), f"listener on {self.name}")

    def send_udp(self, target: str, payload: str = "hello", *, port: int = 0) -> None:
        """Send one datagram to "ip:port" from local UDP ``port`` (0: any)."""
        self.echo("send", "--port", str(port), target, payload, check=True)

    def first_arrival(self, port: int, send: Callable[[], object], *, timeout: float = 10.0) -> str | None:
        """Listen on UDP ``port``, call ``send()``, then send a sentinel to ourselves over loopback.

        Returns ``"ip:port payload"`` of the datagram that arrived first, or None if the sentinel came first
        (what ``send()`` sent was dropped). No timing guess: the sentinel proves the listener was alive.
        """
        listener = self.listen_udp(port, timeout=timeout)
        send()
        self.send_udp(f"127.0.0.1:{port}", SENTINEL)
        got = listener.result(timeout + 5.0)
        if got is None:
            raise LabError(f"listener on {self.name}:{port} got nothing, not even the sentinel")
        return None if got.endswith(f" {SENTINEL}") and got.startswith("127.0.0.1:") else got


_OPEN_LABS: weakref.WeakSet[Lab] = weakref.WeakSet()


@atexit.register
def _close_open_labs() -> None:
    for lab in list(_OPEN_LABS):
        lab.close()


class Lab:
    """An isolated internet in network namespaces. Use as a context manager or call :meth:`close`.

    >>> with Lab() as lab:                                        # doctest: +SKIP
    ...     a = lab.host(nat="upnp"); s = lab.server()
    ...     a.run(["ping", "-c1", s.ip], check=True)
    """

    def __init__(self, *, sweep: bool = True) -> None:
        if sweep:
            sweep_stale()
        self.owner = new_owner()
        self._lock = OwnerLock(self.owner)
        self.tmpdir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{self.owner}-"))
        # Cleans up even if this process is SIGKILLed: it waits for EOF on the pipe we hold.
        self._watchdog = subprocess.Popen(
            [sys.executable, str(WATCHDOG_SCRIPT), self.owner, str(self.tmpdir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.namespaces: list[Namespace] = []
        self.routers: list[Router] = []
        self.hosts: list[Host] = []
        self.carriers: list[Router] = []  #: carrier NATs created for cgnat routers
        self._names: set[str] = set()
        self._counters: dict[str, int] = {}
        self._closed = False
        self._wan_n = 1  # 6.0.0.1 is the internet gateway
        self._inet6 = False  # IPv6 on the internet bridge, set up with the first dual-stack node
        self._pub_n = 0
        self._inet_ports = 0
        self._carriers = 0
        _OPEN_LABS.add(self)
        try:
            self.inet = self._namespace("inet")
            self.inet.sh(
                f"sysctl -qw net.ipv4.ip_forward=1\n"
                f"ip link add {INET_BRIDGE} type bridge mcast_snooping 0\n"
                f"ip addr add {INET_GW}/{INET_PREFIXLEN} dev {INET_BRIDGE}\n"
                f"ip link set {INET_BRIDGE} up\n"
            )
        except BaseException:
            self.close()
            raise

    # -- context manager -------------------------------------------------------------------------
    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Kill every process the lab started and delete every namespace and temp file. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            for ns in reversed(self.namespaces):  # hosts first, the internet last
                ns.stop_processes()
            for ns in reversed(self.namespaces):
                ns.delete()
        finally:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self._lock.release()
            _OPEN_LABS.discard(self)
            if self._watchdog.stdin is not None:
                self._watchdog.stdin.close()
            try:
                self._watchdog.wait(10)
            except subprocess.TimeoutExpired:
                self._watchdog.kill()
                self._watchdog.wait(5)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def watchdog_pid(self) -> int:
        """Pid of the process that cleans up if this one dies without :meth:`close`."""
        return self._watchdog.pid

    def unique_ifname(self, stem: str = "wg") -> str:
        """An interface name unique on this machine (<= 15 chars), for interfaces whose names must not
        collide across namespaces, e.g. wireguard-go's (its UAPI sockets share /var/run/wireguard)."""
        if not re.fullmatch(r"[a-z][a-z0-9]{0,6}", stem):
            raise ValueError(f"bad interface name stem {stem!r}: 1-7 lowercase letters/digits")
        return f"{stem}{secrets.token_hex(4)}"

    # -- building ----------------------------------------------------------------------------------
    def _namespace(self, role: str) -> Namespace:
        if self._closed:
            raise LabError("the lab is closed")
        ns = Namespace(f"{PREFIX}{self.owner}-{role}")
        self.namespaces.append(ns)
        return ns

    def _name(self, name: str | None, default_prefix: str) -> str:
        if name is None:
            n = self._counters.get(default_prefix, 0)
            while f"{default_prefix}{n + 1}" in self._names:
                n += 1
            self._counters[default_prefix] = n + 1
            name = f"{default_prefix}{n + 1}"
        if not _NAME_RE.match(name):
            raise ValueError(f"bad name {name!r}: lowercase letters, digits and '-', at most 20 characters")
        if name in self._names or name == "inet":
            raise ValueError(f"name {name!r} is already used in this lab")
        self._names.add(name)
        return name

    def _inet6_up(self) -> None:
        if not self._inet6:
            self.inet.sh(
                "sysctl -qw net.ipv6.conf.all.forwarding=1 net.ipv6.conf.default.accept_dad=0\n"
                f"sysctl -qw net.ipv6.conf.{INET_BRIDGE}.accept_dad=0\n"
                # its link-local address may still be tentative (duplicate address detection, see _no_dad):
                # neighbour solicitations from it would wait, so it gets one that is valid at once
                f"ip -6 addr flush dev {INET_BRIDGE} scope link\n"
                f"ip -6 addr add fe80::1/64 dev {INET_BRIDGE} nodad\n"
                f"ip -6 addr add {INET_GW6}/64 dev {INET_BRIDGE} nodad\n"
            )
            self._inet6 = True

    @staticmethod
    def _no_dad(netns: Namespace) -> None:
        """Interfaces made in ``netns`` from now on skip duplicate address detection: with it their
        link-local addresses stay tentative for ~2 s and the first IPv6 packets through them are lost."""
        netns.sh("sysctl -qw net.ipv6.conf.default.accept_dad=0 net.ipv6.conf.all.accept_dad=0\n")

    @staticmethod
    def _add6(netns: Namespace, ifname: str, ip6: str, gateway: str) -> None:
        """IPv6 address (no duplicate address detection: usable at once) and default route."""
        netns.sh(f"ip -6 addr add {ip6}/64 dev {ifname} nodad\nip -6 route add default via {gateway}\n")

    def _attach_to_inet(self, netns: Namespace, ifname: str, ip: str, delay_ms: float = 0.0) -> None:
        """Give ``netns`` an interface ``ifname`` with ``ip`` on the internet bridge and a default route.

        With ``delay_ms`` the link runs through a namespace of its own where ``delay.py`` forwards every
        frame that much later in each direction (so a round trip over it costs ``2 * delay_ms``).
        """
        self._inet_ports += 1
        port = f"i{self._inet_ports}"
        if delay_ms <= 0:
            self.inet.sh(
                f"ip link add {port} type veth peer name {ifname} netns {netns.name}\n"
                f"ip link set {port} master {INET_BRIDGE} up\n"
            )
        else:
            wire = self._namespace(f"d{self._inet_ports}")
            self.inet.sh(
                f"ip link add {port} type veth peer name b0 netns {wire.name}\n"
                f"ip link set {port} master {INET_BRIDGE} up\n"
                f"ethtool -K {port} tx off rx off tso off gso off gro off >/dev/null 2>&1 || true\n"
            )
            netns.sh(
                f"ip link add {ifname} type veth peer name a0 netns {wire.name}\n"
                f"ethtool -K {ifname} tx off rx off tso off gso off gro off >/dev/null 2>&1 || true\n"
            )
            offloads = "tx off rx off tso off gso off gro off"  # AF_PACKET forwards frames as they are
            wire.sh(
                f"for i in a0 b0; do ip link set $i up; ethtool -K $i {offloads} >/dev/null 2>&1 || :; done\n"
            )
            proc = wire.popen(
                [sys.executable, str(DELAY_SCRIPT), "a0", "b0", str(delay_ms)], stdout=subprocess.PIPE
            )
            _wait_ready(proc, f"delay link {wire.name}", 10.0)
        if not ip:  # IPv6 only (issue 15)
            netns.sh(f"ip link set {ifname} up\n")
            return
        netns.sh(
            f"ip addr add {ip}/{INET_PREFIXLEN} dev {ifname}\n"
            f"ip link set {ifname} up\n"
            f"ip route add default via {INET_GW}\n"
        )

    def _attach_to_lan(self, router: Router, netns: Namespace, ifname: str, ip: str, prefixlen: int) -> None:
        port = router._next_port()
        router.netns.sh(
            f"ip link add {port} type veth peer name {ifname} netns {netns.name}\n"
            f"ip link set {port} master {LAN} up\n"
        )
        if not ip:  # IPv6 only (issue 15)
            netns.sh(f"ip link set {ifname} up\n")
            return
        netns.sh(
            f"ip addr add {ip}/{prefixlen} dev {ifname}\n"
            f"ip link set {ifname} up\n"
            f"ip route add default via {router.lan_ip}\n"
        )

    def router(
        self,
        nat: str | NatKind = "eim",
        *,
        name: str | None = None,
        carrier: Router | None = None,
        pcp_min_lifetime: int = PCP_MIN_LIFETIME,
        portmap: tuple[str, ...] = rules.PORTMAP_PROTOCOLS,
        wan_delay_ms: float = 0.0,
        ipv6: bool = False,
    ) -> Router:
        """A new router of kind ``nat`` on the internet (for ``cgnat``: behind ``carrier`` or a new one).

        ``pcp_min_lifetime`` (upnp only): the shortest PCP lease miniupnpd grants. The lab default is short
        so renewal can be tested in seconds; pass 120 for miniupnpd's (and many routers') default.
        ``portmap`` (upnp only): the protocols the router speaks, a subset of ("upnp", "natpmp", "pcp").
        ``wan_delay_ms``: one-way latency of the router's link to the internet (not for cgnat homes).
        ``ipv6``: dual-stack (issue 15): a routed IPv6 prefix behind a stateful firewall (module docstring).
        """
        if pcp_min_lifetime < 1:
            raise ValueError("pcp_min_lifetime must be at least 1 s")
        kind = parse_kind(nat)
        if kind is NatKind.PUBLIC:
            raise ValueError("nat='public' has no router: use lab.host(nat='public') or lab.server()")
        if carrier is not None and kind is not NatKind.CGNAT:
            raise ValueError("carrier= is only for nat='cgnat'")
        if kind is NatKind.CGNAT and carrier is None:
            carrier = self._carrier(ipv6=ipv6)
        if ipv6 and carrier is not None and carrier.lan_net6 is None:
            raise ValueError(
                f"carrier {carrier.name} has no IPv6: a dual-stack home needs a dual-stack carrier"
            )
        index = len(self.routers) + 1
        if index > 250:
            raise LabError("at most 250 routers per lab")
        name = self._name(name, "r")
        netns = self._namespace(name)
        if ipv6:
            self._no_dad(netns)
        lan_net = ipaddress.IPv4Network(f"192.168.{index}.0/24")
        upstream = carrier
        if upstream is None:
            self._wan_n += 1
            wan_ip = str(ipaddress.IPv4Address("6.0.0.0") + self._wan_n)
        else:
            wan_ip = str(upstream.lan_net.network_address + 2 + upstream._ports)
        r = Router(self, name, netns, kind, index=index, wan_ip=wan_ip, lan_net=lan_net, upstream=upstream)
        if ipv6:
            r.lan_net6 = ipaddress.IPv6Network(f"2001:db8:{index:x}::/64")
            if upstream is None:
                r.wan_ip6 = f"2001:db8::6:{self._wan_n:x}"
            else:
                assert upstream.lan_net6 is not None
                r.wan_ip6 = str(upstream.lan_net6.network_address + 2 + upstream._ports)
        self.routers.append(r)
        netns.sh(
            "sysctl -qw net.ipv4.ip_forward=1\n"
            f"ip link add {LAN} type bridge mcast_snooping 0\n"
            f"ip addr add {r.lan_ip}/{lan_net.prefixlen} dev {LAN}\n"
            f"ip link set {LAN} up\n"
        )
        if upstream is None:
            self._attach_to_inet(netns, WAN, wan_ip, wan_delay_ms)
        else:
            self._attach_to_lan(upstream, netns, WAN, wan_ip, upstream.lan_net.prefixlen)
        netns.run(["nft", "-f", "-"], input=rules.ruleset(kind), check=True)
        if ipv6:
            self._router6(r)
        if kind is NatKind.UPNP:
            if tuple(portmap) != rules.PORTMAP_PROTOCOLS:
                netns.run(["nft", "-f", "-"], input=rules.portmap_filter(tuple(portmap), LAN), check=True)
            self._start_miniupnpd(r, pcp_min_lifetime, tuple(portmap))
        return r

    def _router6(self, r: Router) -> None:
        """IPv6 for router ``r`` (addresses chosen): forwarding, its LAN prefix, routes to it, firewall."""
        assert r.wan_ip6 is not None and r.lan_net6 is not None
        self._inet6_up()
        lan_gw = r.lan_net6.network_address + 1
        up = r.upstream
        gateway = INET_GW6
        if up is not None:
            assert up.lan_net6 is not None and up.wan_ip6 is not None
            gateway = str(up.lan_net6.network_address + 1)
        r.netns.sh(f"sysctl -qw net.ipv6.conf.all.forwarding=1\nip -6 addr add {lan_gw}/64 dev {LAN} nodad\n")
        self._add6(r.netns, WAN, r.wan_ip6, gateway)
        if up is None:
            self.inet.sh(f"ip -6 route add {r.lan_net6} via {r.wan_ip6}\n")
        else:  # the carrier routes the home's prefix, and the internet routes it to the carrier
            up.netns.sh(f"ip -6 route add {r.lan_net6} via {r.wan_ip6}\n")
            self.inet.sh(f"ip -6 route add {r.lan_net6} via {up.wan_ip6}\n")
        r.netns.run(["nft", "-f", "-"], input=rules.ruleset6(r.kind), check=True)

    def _carrier(self, *, ipv6: bool = False) -> Router:
        """A carrier-grade NAT: EIM with WAN input drop; its LAN is 100.64.<c>.0/24. With ``ipv6`` it also
        routes IPv6 (no NAT, no firewall: that is the home router's job)."""
        self._carriers += 1
        c = self._carriers
        if c > 250:
            raise LabError("at most 250 carrier NATs per lab")
        name = self._name(None, "cgn")
        netns = self._namespace(name)
        if ipv6:
            self._no_dad(netns)
        self._wan_n += 1
        wan_ip = str(ipaddress.IPv4Address("6.0.0.0") + self._wan_n)
        lan_net = ipaddress.IPv4Network(f"100.64.{c}.0/24")
        r = Router(self, name, netns, NatKind.EIM, index=0, wan_ip=wan_ip, lan_net=lan_net, upstream=None)
        netns.sh(
            "sysctl -qw net.ipv4.ip_forward=1\n"
            f"ip link add {LAN} type bridge mcast_snooping 0\n"
            f"ip addr add {r.lan_ip}/{lan_net.prefixlen} dev {LAN}\n"
            f"ip link set {LAN} up\n"
        )
        self._attach_to_inet(netns, WAN, wan_ip)
        netns.run(["nft", "-f", "-"], input=rules.ruleset(NatKind.EIM), check=True)
        if ipv6:
            self._inet6_up()
            r.wan_ip6 = f"2001:db8::6:{self._wan_n:x}"
            r.lan_net6 = ipaddress.IPv6Network(f"2001:db8:100:{c:x}::/64")
            netns.sh(
                "sysctl -qw net.ipv6.conf.all.forwarding=1\n"
                f"ip -6 addr add {r.lan_net6.network_address + 1}/64 dev {LAN} nodad\n"
            )
            self._add6(netns, WAN, r.wan_ip6, INET_GW6)
            self.inet.sh(f"ip -6 route add {r.lan_net6} via {r.wan_ip6}\n")
        self.carriers.append(r)
        return r

    def _start_miniupnpd(self, r: Router, min_lifetime: int, protocols: tuple[str, ...]) -> None:
        conf = self.tmpdir / f"{r.name}-miniupnpd.conf"
        conf.write_text(
            rules.miniupnpd_conf(
                ext_ifname=WAN,
                listening_ip=LAN,
                lan_cidr=str(r.lan_net),
                uuid=str(uuid.uuid4()),
                lease_file=str(self.tmpdir / f"{r.name}-miniupnpd.leases"),
                min_lifetime=min_lifetime,
                protocols=protocols,
            )
        )
        r.netns.run(["nft", "-f", "-"], input=rules.miniupnpd_ruleset(), check=True)
        log = (self.tmpdir / f"{r.name}-miniupnpd.log").open("wb")
        with log:
            r.miniupnpd = r.popen(
                ["miniupnpd", "-f", str(conf), "-d", "-P", str(self.tmpdir / f"{r.name}-miniupnpd.pid")],
                stdout=log,
                stderr=log,
            )
        # Ready when NAT-PMP/PCP (udp 5351) and the IGD HTTP server listen (bounded wait).
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            if r.miniupnpd.poll() is not None:
                raise LabError(f"miniupnpd on {r.name} exited {r.miniupnpd.returncode}: {r.miniupnpd_log()}")
            if "natpmp" in protocols or "pcp" in protocols:
                ss = r.run(["ss", "-Hlnu", "sport", "= :5351"], timeout=5).stdout
            else:  # UPnP only: its HTTP server (random port) on the LAN address
                ss = r.run(["sh", "-c", "ss -Hlntp | grep miniupnpd || true"], timeout=5).stdout
            if ss.strip():
                return
            time.sleep(0.05)
        raise LabError(f"miniupnpd on {r.name} not listening within 5 s: {r.miniupnpd_log()}")

    def host(
        self,
        nat: str | NatKind | None = None,
        *,
        router: Router | None = None,
        name: str | None = None,
        portmap: tuple[str, ...] | None = None,
        wan_delay_ms: float = 0.0,
        ipv6: bool | str = False,
    ) -> Host:
        """A host behind a new router of kind ``nat`` (default ``eim``), or behind ``router``.

        ``nat="public"`` puts the host directly on the internet (no router, no firewall).
        ``ipv6=True``: dual-stack (a new router is made dual-stack too; ``router=`` must be); ``"only"``:
        an IPv6 address and no IPv4 one (issue 15).
        """
        if ipv6 not in (False, True, "only"):
            raise ValueError(f"ipv6={ipv6!r}: use False, True or 'only'")
        if router is not None and nat is not None:
            raise ValueError("give either nat= (a new router) or router= (an existing one), not both")
        if router is None:
            kind = parse_kind(nat if nat is not None else "eim")
            if kind is NatKind.PUBLIC:
                return self._public(name, "h", wan_delay_ms, ipv6=ipv6)
            opts: dict[str, Any] = {"wan_delay_ms": wan_delay_ms}
            if ipv6:
                opts["ipv6"] = True
            if portmap is not None:
                opts["portmap"] = portmap
            router = self.router(kind, **opts)
        if router.lab is not self:
            raise ValueError(f"router {router.name} belongs to another lab")
        if ipv6 and router.lan_net6 is None:
            raise ValueError(f"router {router.name} has no IPv6: make it with ipv6=True")
        j = len(router.hosts) + 1
        if j > 240:
            raise LabError(f"at most 240 hosts behind router {router.name}")
        name = self._name(name, "h")
        netns = self._namespace(name)
        if ipv6:
            self._no_dad(netns)
        ip = str(router.lan_net.network_address + 9 + j)
        ip6 = str(router.lan_net6.network_address + 9 + j) if ipv6 and router.lan_net6 is not None else None
        h = Host(self, name, netns, ip6 if ipv6 == "only" and ip6 else ip, router, ip6)
        self._attach_to_lan(router, netns, "eth0", "" if ipv6 == "only" else ip, router.lan_net.prefixlen)
        if ip6 is not None and router.lan_net6 is not None:
            self._add6(netns, "eth0", ip6, str(router.lan_net6.network_address + 1))
        router.hosts.append(h)
        self.hosts.append(h)
        return h

    def server(self, *, name: str | None = None, delay_ms: float = 0.0, ipv6: bool | str = False) -> Host:
        """A public host (no NAT, no firewall) for the coordinator, STUN-like checks and echo servers;
        ``delay_ms`` is the one-way latency of its link; ``ipv6`` as for :meth:`host`."""
        if ipv6 not in (False, True, "only"):
            raise ValueError(f"ipv6={ipv6!r}: use False, True or 'only'")
        return self._public(name, "s", delay_ms, ipv6=ipv6)

    def _public(
        self, name: str | None, prefix: str, delay_ms: float = 0.0, *, ipv6: bool | str = False
    ) -> Host:
        self._pub_n += 1
        if self._pub_n > 60000:
            raise LabError("too many public hosts")
        name = self._name(name, prefix)
        netns = self._namespace(name)
        if ipv6:
            self._no_dad(netns)
        ip = str(ipaddress.IPv4Address("7.0.0.0") + self._pub_n)
        ip6 = f"2001:db8::7:{self._pub_n:x}" if ipv6 else None
        h = Host(self, name, netns, ip6 if ipv6 == "only" and ip6 else ip, None, ip6)
        self._attach_to_inet(netns, "eth0", "" if ipv6 == "only" else ip, delay_ms)
        if ip6 is not None:
            self._inet6_up()
            self._add6(netns, "eth0", ip6, INET_GW6)
        self.hosts.append(h)
        return h

    # -- debugging ---------------------------------------------------------------------------------
    def describe(self) -> str:
        """One line per node: name, namespace, addresses (for logs)."""
        lines = [f"inet {self.inet.name} {INET_GW}/{INET_PREFIXLEN}"]
        for r in [*self.carriers, *self.routers]:
            up = f" via {r.upstream.name}" if r.upstream else ""
            six = f" wan6={r.wan_ip6} lan6={r.lan_net6}" if r.lan_net6 is not None else ""
            lines.append(f"router {r.name} [{r.kind}] ns={r.ns} wan={r.wan_ip}{up} lan={r.lan_net}{six}")
        for h in self.hosts:
            where = f"behind {h.router.name}" if h.router else "public"
            six = f" ip6={h.ip6}" if h.ip6 is not None else ""
            lines.append(f"host {h.name} ns={h.ns} ip={h.ip}{six} {where}")
        return "\n".join(lines)

    def dump(self) -> str:
        """Routers' nft rulesets and conntrack tables, miniupnpd logs: what you want after a failure."""
        if self._closed:
            return "(lab closed)"
        parts = [self.describe()]
        for r in [*self.carriers, *self.routers]:
            parts.append(f"--- {r.name} nft ---\n{r.nft()}")
            parts.append(f"--- {r.name} conntrack ---\n{r.conntrack()}")
            if r.kind is NatKind.UPNP:
                parts.append(f"--- {r.name} miniupnpd ---\n{r.miniupnpd_log()}")
        return "\n".join(parts)
