"""Access policy: a TOML file of groups, tag owners, hosts, rules and tests.

::

    [groups]                       # groups of users (members are user names, bare or "user:NAME")
    eng = ["alice", "bob"]

    [tag_owners]                   # who may put each tag on a pre-auth key; rules may only use these tags
    "tag:db" = ["group:ops"]       # owners: users (bare or "user:NAME") and groups

    [hosts]                        # aliases: a name for an overlay address or a network
    backup = "100.64.0.9"

    [[rules]]                      # these sources may reach these destinations
    src = ["group:eng", "tag:ci"]
    dst = ["tag:db:5432", "backup:22,8000-8100"]
    proto = "tcp"                  # tcp | udp | icmp | any (default any; icmp needs port "*")

    [[tests]]                      # checked by `policy set`: a failing test rejects the policy
    src = "user:alice"
    accept = ["tag:db:5432"]
    deny = ["backup:5432"]

A source or destination is ``*`` (everyone), ``user:NAME`` (that user's untagged nodes),
``node:NAME`` (the node of that name), ``group:NAME``, ``tag:NAME``, a host alias, or an IP or CIDR.
A plain name that is not a host alias is refused: it used to match a user's nodes *or* a node of that
name, and nodes choose their own names at enrollment, so a node named ``alice`` got alice's grants
(issue #12). Users and nodes are now written apart; a node can never become a ``user:`` by its name.
Group members and tag owners stay bare user names (a group holds users only, so there is nothing to
confuse them with); ``user:NAME`` is accepted there too. A tagged node is identified by its tags, not by
the user who enrolled it. Destinations end in ``:PORTS`` (``*``, ``22``,
``80,443``, ``8000-8100``). With no policy everything is allowed. Anything not allowed is denied;
allowing a->b also lets b's replies back (stateful), and both see each other in their maps.

:func:`parse` validates (every problem is one line naming the file line); :class:`Compiled` answers
"which peers may this node see" and "which inbound rules does this node enforce" for the live nodes.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from meshd.proto.policy import ALLOW_ALL, PROTOCOLS, InboundRule

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_TAG_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_ANY_NETS = ("0.0.0.0/0", "::/0")
_SECTIONS = {"groups", "tag_owners", "hosts", "rules", "tests"}
_PREFIXES = ("user", "node", "group", "tag")
_PREFIXES_COLON = tuple(f"{p}:" for p in _PREFIXES)


def _bare_problem(text: str) -> str:
    """Why a plain word is refused as a selector, and what to write instead."""
    if _NAME_RE.fullmatch(text):
        return f'"{text}" is ambiguous: write "user:{text}" or "node:{text}" (or declare it in [hosts])'
    return f"bad selector {text!r}: use *, user:NAME, node:NAME, group:NAME, tag:NAME, a host alias or an IP"


class PolicyError(ValueError):
    """The policy is malformed, refers to unknown names, or its tests fail; one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def tag_name(tag: str) -> str:
    """``tag:db`` and ``db`` are the same tag."""
    return tag[4:] if tag.startswith("tag:") else tag


@dataclass(frozen=True, slots=True)
class Selector:
    """A set of nodes: kind is any | group | tag | host | net | user | node."""

    kind: str
    name: str = ""
    net: IPNetwork | None = None


@dataclass(frozen=True, slots=True)
class Dest:
    selector: Selector
    ports: tuple[tuple[int, int], ...]  #: () = every port


@dataclass(frozen=True, slots=True)
class Rule:
    src: tuple[Selector, ...]
    dst: tuple[Dest, ...]
    proto: str
    line: int


@dataclass(frozen=True, slots=True)
class PolicyTest:
    src: str
    accept: tuple[str, ...]
    deny: tuple[str, ...]
    proto: str
    line: int
    where: Mapping[tuple[bool, str], int] = field(default_factory=dict)  #: (accept?, dst) -> its line


@dataclass(frozen=True, slots=True)
class Member:
    """A node as the policy sees it."""

    node_id: int
    name: str
    user: str
    tags: frozenset[str]
    ips: tuple[IPNetwork, ...]
    routes: tuple[IPNetwork, ...] = ()  #: approved prefixes it routes for others (issue 17)


@dataclass(frozen=True)
class Policy:
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    tag_owners: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    hosts: Mapping[str, IPNetwork] = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()
    tests: tuple[PolicyTest, ...] = ()

    def may_assign(self, user: str, tag: str) -> bool:
        """May `user` put `tag` on a pre-auth key? (owners are stored without a ``user:`` prefix)"""
        for owner in self.tag_owners.get(tag_name(tag), ()):
            if owner == user or (owner.startswith("group:") and user in self.groups.get(owner[6:], ())):
                return True
        return False


# ------------------------------------------------------------------------------------------- parsing
class _Lines:
    """Finds the line a value was written on (tomllib reports positions only for syntax errors)."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()

    def header(self, section: str, index: int = 0) -> int:
        seen = 0
        pattern = re.compile(rf"^\s*\[\[?\s*{re.escape(section)}\s*\]\]?")
        for n, line in enumerate(self.lines, 1):
            if pattern.match(line):
                if seen == index:
                    return n
                seen += 1
        return 1

    def find(self, needle: str, start: int) -> int:
        for n in range(max(start, 1), len(self.lines) + 1):
            if needle in self.lines[n - 1]:
                return n
        return start


def _ports(spec: str) -> tuple[tuple[int, int], ...]:
    if spec == "*":
        return ()
    out = []
    for part in spec.split(","):
        first, _, last = part.strip().partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            raise ValueError(f"bad port {part.strip()!r}: use N, N-M, a comma list or *")
        lo, hi = int(first), int(last or first)
        if hi > 65535 or lo > hi:
            raise ValueError(f"bad port range {part.strip()!r}")
        out.append((lo, hi))
    return tuple(out)


class _Parser:
    def __init__(
        self, text: str, users: Collection[str] | None, nodes: Collection[str] | None, legacy: bool = False
    ) -> None:
        self.text = text
        self.legacy = legacy  #: a stored policy from before user:/node:: a bare NAME means user:NAME
        self.lines = _Lines(text)
        self.users = users
        self.nodes = nodes
        self.problems: list[str] = []
        self.groups: dict[str, tuple[str, ...]] = {}
        self.tag_owners: dict[str, tuple[str, ...]] = {}
        self.hosts: dict[str, IPNetwork] = {}

    def bad(self, line: int, message: str) -> None:
        self.problems.append(f"line {line}: {message}")

    def strings(self, value: Any, line: int, what: str) -> list[str]:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        self.bad(line, f"{what} must be a string or a list of strings")
        return []

    def selector(self, text: str, line: int) -> Selector | None:
        where = self.lines.find(f'"{text}', line)
        if text == "*":
            return Selector("any")
        if text.startswith("group:"):
            if text[6:] not in self.groups:
                self.bad(where, f"unknown group {text!r}")
                return None
            return Selector("group", text[6:])
        if text.startswith("tag:"):
            if tag_name(text) not in self.tag_owners:
                self.bad(where, f"unknown tag {text!r} (declare it in [tag_owners])")
                return None
            return Selector("tag", tag_name(text))
        if text.startswith(("user:", "node:")):
            kind, name = text[:4], text[5:]
            known = self.users if kind == "user" else self.nodes
            if not _NAME_RE.fullmatch(name) or (known is not None and name not in known):
                self.bad(where, f"unknown {kind} {name!r}")
                return None
            return Selector(kind, name)
        if text in self.hosts:
            return Selector("host", text, self.hosts[text])
        try:
            return Selector("net", text, ipaddress.ip_network(text, strict=False))
        except ValueError:
            pass
        if self.legacy and _NAME_RE.fullmatch(text):
            return Selector("user", text)  # never a node's name: that is what let a hostname take grants
        self.bad(where, _bare_problem(text))
        return None

    def dest(self, text: str, line: int) -> Dest | None:
        where, colon, ports = text.rpartition(":")
        if not colon or not where or where in _PREFIXES:
            self.bad(self.lines.find(f'"{text}', line), f"destination {text!r} needs :PORTS (e.g. :22 or :*)")
            return None
        try:
            port_ranges = _ports(ports)
        except ValueError as exc:
            self.bad(self.lines.find(f'"{text}', line), f"destination {text!r}: {exc}")
            return None
        selector = self.selector(where, line)
        return None if selector is None else Dest(selector, port_ranges)

    def users_of(self, value: Any, line: int, what: str, *, groups: bool) -> list[str]:
        """Users (bare or ``user:NAME``, stored bare) and, where `groups`, ``group:NAME``: never nodes."""
        out = []
        for item in self.strings(value, line, what):
            if groups and item.startswith("group:"):
                out.append(item)
                continue
            name = item[5:] if item.startswith("user:") else item
            if ":" in name or not _NAME_RE.fullmatch(name):
                allowed = "users (NAME or user:NAME)" + (" and group:NAME" if groups else "")
                self.bad(self.lines.find(f'"{item}', line), f"{what}: {item!r} is not a user; list {allowed}")
                continue
            out.append(name)
        return out

    def test_target(self, text: str, line: int) -> None:
        """A test's source or destination (without :PORT) must be unambiguous, like a rule's."""
        if text.startswith((*_PREFIXES_COLON, "*")) or text in self.hosts:
            return
        if self.legacy and _NAME_RE.fullmatch(text):
            return
        try:
            ipaddress.ip_network(text, strict=False)
        except ValueError:
            self.bad(self.lines.find(f'"{text}', line), _bare_problem(text))

    def table(self, raw: dict[str, Any], key: str) -> dict[str, Any]:
        value = raw.get(key, {})
        if not isinstance(value, dict):
            self.bad(self.lines.header(key), f"[{key}] must be a table")
            return {}
        return value

    def parse(self) -> Policy:
        try:
            raw = tomllib.loads(self.text)
        except tomllib.TOMLDecodeError as exc:
            match = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
            reason = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
            if match:
                where = f"line {match.group(1)}, column {match.group(2)}"
            else:  # "(at end of document)": the last line
                where, reason = f"line {max(len(self.lines.lines), 1)}", str(exc)
            raise PolicyError([f"{where}: {reason}"]) from None
        for key in raw:
            if key not in _SECTIONS:
                self.bad(
                    self.lines.find(key, 1),
                    f"unknown section {key!r} (known: {', '.join(sorted(_SECTIONS))})",
                )
        start = self.lines.header("groups")
        for name, members in self.table(raw, "groups").items():
            line = self.lines.find(name, start)
            name = name[6:] if name.startswith("group:") else name
            if not _NAME_RE.fullmatch(name):
                self.bad(line, f"bad group name {name!r}")
            self.groups[name] = tuple(self.users_of(members, line, f"group {name!r}", groups=False))
        start = self.lines.header("tag_owners")
        for tag, owners in self.table(raw, "tag_owners").items():
            line = self.lines.find(tag, start)
            if not _TAG_RE.fullmatch(tag_name(tag)):
                self.bad(line, f"bad tag {tag!r}: lowercase letters, digits and '-'")
            owner_list = self.users_of(owners, line, f"owners of {tag!r}", groups=True)
            for owner in owner_list:
                if owner.startswith("group:") and owner[6:] not in self.groups:
                    self.bad(line, f"unknown group {owner!r}")
            self.tag_owners[tag_name(tag)] = tuple(owner_list)
        start = self.lines.header("hosts")
        for host, address in self.table(raw, "hosts").items():
            line = self.lines.find(host, start)
            if not _NAME_RE.fullmatch(host) or ":" in host:
                self.bad(line, f"bad host name {host!r}")
                continue
            try:
                self.hosts[host] = ipaddress.ip_network(address, strict=False)
            except (ValueError, TypeError):
                self.bad(line, f"host {host!r}: {address!r} is not an IP address or network")
        rules = self.rules(raw.get("rules", []))
        tests = self.tests(raw.get("tests", []))
        if self.problems:
            raise PolicyError(self.problems)
        return Policy(self.groups, self.tag_owners, self.hosts, rules, tests)

    def entries(self, value: Any, section: str) -> list[tuple[int, dict[str, Any]]]:
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            self.bad(self.lines.find(section, 1), f"{section} must be [[{section}]] tables")
            return []
        return [(self.lines.header(section, i), v) for i, v in enumerate(value)]

    def proto(self, entry: dict[str, Any], line: int, default: str) -> str:
        proto = entry.get("proto", default)
        if proto not in PROTOCOLS:
            self.bad(
                self.lines.find("proto", line), f"proto must be one of {', '.join(PROTOCOLS)}, not {proto!r}"
            )
            return default
        return str(proto)

    def rules(self, value: Any) -> tuple[Rule, ...]:
        out = []
        for line, entry in self.entries(value, "rules"):
            for key in entry.keys() - {"src", "dst", "proto"}:
                self.bad(self.lines.find(key, line), f"unknown rule field {key!r} (src, dst, proto)")
            if "src" not in entry or "dst" not in entry:
                self.bad(line, "a rule needs src and dst")
                continue
            proto = self.proto(entry, line, "any")
            src = [self.selector(s, line) for s in self.strings(entry["src"], line, "src")]
            dst = [self.dest(d, line) for d in self.strings(entry["dst"], line, "dst")]
            if proto == "icmp" and any(d is not None and d.ports for d in dst):
                self.bad(line, 'icmp has no ports: write destinations as "NAME:*"')
            out.append(
                Rule(
                    tuple(s for s in src if s is not None),
                    tuple(d for d in dst if d is not None),
                    proto,
                    line,
                )
            )
        return tuple(out)

    def tests(self, value: Any) -> tuple[PolicyTest, ...]:
        out = []
        for line, entry in self.entries(value, "tests"):
            for key in entry.keys() - {"src", "accept", "deny", "proto"}:
                self.bad(self.lines.find(key, line), f"unknown test field {key!r} (src, accept, deny, proto)")
            src = entry.get("src")
            if not isinstance(src, str):
                self.bad(line, 'a test needs src = "user:NAME", "node:NAME", a tag, host alias or IP')
                continue
            self.test_target(src, line)
            accept = self.strings(entry.get("accept", []), line, "accept")
            deny = self.strings(entry.get("deny", []), line, "deny")
            for d in (*accept, *deny):
                target = d.rpartition(":")[0]
                if not target or target in _PREFIXES:
                    self.bad(self.lines.find(f'"{d}', line), f"test destination {d!r} needs :PORT")
                else:
                    self.test_target(target, line)
            where = {
                (kind == "accept", d): self.lines.find(f'"{d}"', self.lines.find(kind, line))
                for kind, ds in (("accept", accept), ("deny", deny))
                for d in ds
            }
            out.append(
                PolicyTest(src, tuple(accept), tuple(deny), self.proto(entry, line, "tcp"), line, where)
            )
        return tuple(out)


def parse(text: str, users: Collection[str] | None = None, nodes: Collection[str] | None = None) -> Policy:
    """Validate and parse a policy. With `users`/`nodes` given, ``user:``/``node:`` names must be in them."""
    return _Parser(text, users, nodes).parse()


def parse_stored(text: str) -> tuple[Policy, bool]:
    """A policy read back from the database; True when it needed the legacy reading.

    ``policy set`` refuses bare names since selectors say what they name, but a policy stored by an
    earlier version may hold them. Denying all traffic after an upgrade would break working meshes, so a
    stored bare NAME is read as ``user:NAME``, the only reading that cannot hand grants to a node for
    its hostname. The next ``policy set`` must use the new form.
    """
    try:
        return parse(text), False
    except PolicyError:
        return _Parser(text, None, None, legacy=True).parse(), True


# ------------------------------------------------------------------------------------------ evaluating
def _matches(policy: Policy, sel: Selector, m: Member) -> bool:
    if sel.kind == "any":
        return True
    if sel.kind == "tag":
        return sel.name in m.tags
    if sel.kind in ("host", "net"):
        assert sel.net is not None
        return any(ip.version == sel.net.version and ip.subnet_of(sel.net) for ip in m.ips)  # type: ignore[arg-type]
    if sel.kind == "group":
        return not m.tags and m.user in policy.groups.get(sel.name, ())
    if sel.kind == "user":
        return not m.tags and m.user == sel.name
    # a node's name is only ever matched by node:NAME, so choosing a name can never make it a user's
    return sel.kind == "node" and m.name == sel.name


def routed(sel: Selector, m: Member) -> tuple[IPNetwork, ...]:
    """The part of `m`'s routed prefixes a destination selector names (subnet routers, exit nodes).

    ``*`` names all of them; an IP, CIDR or host alias names its overlap with each prefix (the narrower of
    the two); user:, node:, group: and tag: name nodes' own addresses only, never what they route."""
    if sel.kind == "any":
        return m.routes
    if sel.kind not in ("host", "net") or sel.net is None:
        return ()
    out: list[IPNetwork] = []
    for r in m.routes:
        if r.version == sel.net.version and r.overlaps(sel.net):
            out.append(sel.net if sel.net.subnet_of(r) else r)  # type: ignore[arg-type]
    return tuple(out)


def _port_ok(ports: tuple[tuple[int, int], ...], port: int | None) -> bool:
    return not ports or (port is not None and any(lo <= port <= hi for lo, hi in ports))


def _proto_ok(rule: Rule, d: Dest, proto: str) -> bool:
    if rule.proto == "any":
        return proto != "icmp" or not d.ports
    return rule.proto == proto


def allowed(policy: Policy, src: Member, dst: Member, proto: str, port: int | None) -> bool:
    """May `src` open a `proto` connection to `dst` on `port`?"""
    for rule in policy.rules:
        if not any(_matches(policy, s, src) for s in rule.src):
            continue
        for d in rule.dst:
            if _matches(policy, d.selector, dst) and _proto_ok(rule, d, proto) and _port_ok(d.ports, port):
                return True
    return False


def _member_for(policy: Policy, name: str, members: Iterable[Member]) -> Member | None:
    if name.startswith("node:"):
        for m in members:
            if m.name == name[5:]:
                return m
        return Member(-1, name[5:], "", frozenset(), ())  # not enrolled yet: matched by node:NAME only
    if name.startswith("user:"):
        return Member(-1, "", name[5:], frozenset(), ())  # one of the user's untagged nodes
    if name.startswith("tag:"):
        return Member(-1, "", "", frozenset({tag_name(name)}), ())
    if name in policy.hosts:
        return Member(-1, "", "", frozenset(), (policy.hosts[name],))
    try:
        return Member(-1, "", "", frozenset(), (ipaddress.ip_network(name, strict=False),))
    except ValueError:
        return None


def run_tests(policy: Policy, members: Iterable[Member] = ()) -> list[str]:
    """The failing tests, one line each (empty when all pass)."""
    members = list(members)
    failures = []
    for t in policy.tests:
        src = _member_for(policy, t.src, members)
        if src is None:
            failures.append(f"line {t.line}: test source {t.src!r} is not a node, user, tag or host")
            continue
        for expect, targets in ((True, t.accept), (False, t.deny)):
            for target in targets:
                where, _, port_text = target.rpartition(":")
                dst = _member_for(policy, where, members)
                port = int(port_text) if port_text.isdigit() else None
                if dst is None:
                    failures.append(
                        f"line {t.line}: test destination {where!r} is not a node, user, tag or host"
                    )
                elif allowed(policy, src, dst, t.proto, port) != expect:
                    verb = "may not" if expect else "may"
                    at = t.where.get((expect, target), t.line)
                    failures.append(f"line {at}: test failed: {t.src} {verb} reach {target} ({t.proto})")
    return failures


def check(text: str, users: Collection[str] | None = None, members: Collection[Member] = ()) -> Policy:
    """Parse, then run the policy's own tests against `members`; PolicyError lists every problem."""
    policy = parse(text, users, {m.name for m in members} if members else None)
    failures = run_tests(policy, members)
    if failures:
        raise PolicyError(failures)
    return policy


# ------------------------------------------------------------------------------------------- compiling
class Compiled:
    """A policy applied to the live nodes: per-node visible peers and inbound rules (cached)."""

    def __init__(self, policy: Policy | None, members: Iterable[Member]) -> None:
        self.policy = policy
        self.members = {m.node_id: m for m in members}
        self._visible: dict[int, frozenset[int] | None] = {}
        self._inbound: dict[int, tuple[InboundRule, ...]] = {}
        self._rules: list[
            tuple[Rule, frozenset[int] | None, tuple[str, ...], list[tuple[Dest, frozenset[int]]]]
        ] = []
        if policy is None:
            return
        everyone = list(self.members.values())
        for rule in policy.rules:
            any_src = any(s.kind == "any" for s in rule.src)
            src_ids = (
                None
                if any_src
                else frozenset(m.node_id for m in everyone if any(_matches(policy, s, m) for s in rule.src))
            )
            nets: list[str] = list(_ANY_NETS) if any_src else []
            if not any_src:
                for s in rule.src:
                    if s.net is not None:
                        nets.append(str(s.net))
                for i in sorted(src_ids or ()):
                    nets.extend(str(ip) for ip in self.members[i].ips)
            dsts = [
                (
                    d,
                    frozenset(
                        m.node_id
                        for m in everyone
                        if _matches(policy, d.selector, m) or routed(d.selector, m)
                    ),
                )
                for d in rule.dst
            ]
            self._rules.append((rule, src_ids, tuple(dict.fromkeys(nets)), dsts))

    @property
    def restricts(self) -> bool:
        return self.policy is not None

    def visible(self, node_id: int) -> frozenset[int] | None:
        """Peers `node_id` may talk to in either direction (None: all)."""
        if self.policy is None:
            return None
        if node_id in self._visible:
            return self._visible[node_id]
        seen: set[int] = set()
        result: frozenset[int] | None
        for _, src_ids, _, dsts in self._rules:
            in_src = src_ids is None or node_id in src_ids
            for _, dst_ids in dsts:
                if in_src:
                    seen |= dst_ids
                if node_id in dst_ids:
                    if src_ids is None:
                        self._visible[node_id] = None
                        return None
                    seen |= src_ids
        seen.discard(node_id)
        result = frozenset(seen)
        self._visible[node_id] = result
        return result

    def inbound(self, node_id: int) -> tuple[InboundRule, ...]:
        """The rules `node_id` enforces on its mesh interface."""
        if self.policy is None:
            return ALLOW_ALL
        cached = self._inbound.get(node_id)
        if cached is not None:
            return cached
        out: list[InboundRule] = []
        me = self.members.get(node_id)
        for rule, _, nets, dsts in self._rules:
            for d, dst_ids in dsts:
                if node_id not in dst_ids or not nets:
                    continue
                candidates = []
                if me is None or _matches(self.policy, d.selector, me):
                    candidates.append(InboundRule(nets, rule.proto, d.ports))
                through = routed(d.selector, me) if me is not None else ()
                if through:  # traffic this node forwards (subnet router, exit node): dst says where to
                    candidates.append(InboundRule(nets, rule.proto, d.ports, tuple(str(n) for n in through)))
                for r in candidates:
                    if r not in out:
                        out.append(r)
        result = tuple(out)
        self._inbound[node_id] = result
        return result
