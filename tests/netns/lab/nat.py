"""Router kinds and the nftables ruleset each one loads (pure text, no I/O).

Every NATing kind masquerades what leaves ``wan0``. Unless said otherwise a router behaves like a home router:
new connections arriving on ``wan0`` are dropped on the input hook (so an unsolicited packet never creates a
conntrack entry for the router itself) and on the forward hook unless a port map (DNAT) sent them.
"""

from __future__ import annotations

from enum import StrEnum

WAN = "wan0"
LAN = "lan0"
TABLE = "meshlab"


class NatKind(StrEnum):
    """What kind of network a host sits behind."""

    PUBLIC = "public"  #: no router, no NAT: the host is directly on the internet
    EIM = "eim"  #: endpoint-independent mapping (masquerade keeps the port), WAN input drop
    EIM_NOFW = "eim-nofw"  #: as EIM without the WAN input drop: a peer's early packet moves the mapping
    EDM = "edm"  #: endpoint-dependent mapping (masquerade random,fully-random), WAN input drop
    UPNP = "upnp"  #: as EIM plus miniupnpd (UPnP IGD, NAT-PMP, PCP) on the LAN
    UDP_BLOCKED = "udp-blocked"  #: as EIM, and UDP leaving through the WAN is dropped (TCP only)
    CGNAT = "cgnat"  #: an EIM home router whose WAN is on 100.64.0.0/10 behind a carrier EIM NAT


def parse_kind(value: str | NatKind) -> NatKind:
    """The :class:`NatKind` for ``value``; ``ValueError`` naming the valid kinds otherwise."""
    try:
        return NatKind(value)
    except ValueError:
        valid = ", ".join(k.value for k in NatKind)
        raise ValueError(f"unknown NAT kind {value!r} (valid: {valid})") from None


def ruleset(kind: NatKind) -> str:
    """The ``nft -f`` input for a router of ``kind`` (its own table; miniupnpd's tables are separate)."""
    if kind is NatKind.PUBLIC:
        raise ValueError("a public host has no router")
    input_rules = "" if kind is NatKind.EIM_NOFW else f'iifname "{WAN}" ct state new drop\n'
    forward_rules = f'iifname "{WAN}" ct state new ct status dnat accept\niifname "{WAN}" ct state new drop\n'
    if kind is NatKind.UDP_BLOCKED:
        forward_rules += f'oifname "{WAN}" meta l4proto udp drop\n'
    masq = "masquerade random,fully-random" if kind is NatKind.EDM else "masquerade"
    return f"""
table ip {TABLE} {{
    chain input {{
        type filter hook input priority filter; policy accept;
        {input_rules}
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        {forward_rules}
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "{WAN}" {masq}
    }}
}}
"""


TABLE6 = "meshlab6"


def ruleset6(kind: NatKind) -> str:
    """The ``nft -f`` input for a dual-stack router's IPv6 side (issue 15): routed, no NAT, and a stateful
    firewall as home routers have: new connections from ``wan0`` are dropped on the forward hook (so a
    host is reachable only at an address and port it sent to first) and, unless ``eim-nofw``, on the input
    hook. ICMPv6 reaches the router itself (neighbour discovery must); errors about a flow pass as related.
    ``udp-blocked`` drops UDP leaving ``wan0`` over IPv6 too."""
    if kind is NatKind.PUBLIC:
        raise ValueError("a public host has no router")
    input_rules = "" if kind is NatKind.EIM_NOFW else f'iifname "{WAN}" ct state new drop\n'
    forward_rules = f'iifname "{WAN}" ct state new drop\n'
    if kind is NatKind.UDP_BLOCKED:
        forward_rules += f'oifname "{WAN}" meta l4proto udp drop\n'
    return f"""
table ip6 {TABLE6} {{
    chain input {{
        type filter hook input priority filter; policy accept;
        meta l4proto ipv6-icmp accept
        {input_rules}
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        {forward_rules}
    }}
}}
"""


#: miniupnpd's own tables and chains (it adds DNAT and filter rules to these, never creates them).
MINIUPNPD_TABLE = "miniupnpd"
MINIUPNPD_NAT_TABLE = "miniupnpd_nat"
MINIUPNPD_FORWARD_CHAIN = "miniupnpd"
MINIUPNPD_NAT_CHAIN = "prerouting_miniupnpd"
MINIUPNPD_POSTROUTING_CHAIN = "postrouting_miniupnpd"


def miniupnpd_ruleset(family: str = "inet") -> str:
    """The tables/chains miniupnpd expects (what Debian's broken ``nft_init.sh`` would have made)."""
    return f"""
table {family} {MINIUPNPD_TABLE} {{
    chain forward {{
        type filter hook forward priority filter; policy accept;
        jump {MINIUPNPD_FORWARD_CHAIN}
    }}
    chain {MINIUPNPD_FORWARD_CHAIN} {{
    }}
}}
table {family} {MINIUPNPD_NAT_TABLE} {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        jump {MINIUPNPD_NAT_CHAIN}
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        jump {MINIUPNPD_POSTROUTING_CHAIN}
    }}
    chain {MINIUPNPD_NAT_CHAIN} {{
    }}
    chain {MINIUPNPD_POSTROUTING_CHAIN} {{
    }}
}}
"""


PORTMAP_PROTOCOLS = ("upnp", "natpmp", "pcp")


def portmap_filter(protocols: tuple[str, ...], lan_ifname: str) -> str:
    """nft rules that make miniupnpd look like a router speaking only ``protocols``.

    NAT-PMP and PCP share udp/5351 and one miniupnpd switch; the first payload byte is the version
    (0: NAT-PMP, RFC 6886 §3; 2: PCP, RFC 6887 §7), so the unwanted one is dropped by that byte.
    """
    unknown = set(protocols) - set(PORTMAP_PROTOCOLS)
    if unknown or not protocols:
        raise ValueError(f"portmap protocols must be a non-empty subset of {PORTMAP_PROTOCOLS}: {protocols}")
    drops = []
    if "natpmp" not in protocols:
        drops.append(f'iifname "{lan_ifname}" udp dport 5351 @th,64,8 0 drop')
    if "pcp" not in protocols:
        drops.append(f'iifname "{lan_ifname}" udp dport 5351 @th,64,8 2 drop')
    body = "\n        ".join(drops)
    return f"""
table ip meshlab_pmp {{
    chain input {{
        type filter hook input priority filter - 1; policy accept;
        {body}
    }}
}}
"""


def miniupnpd_conf(
    *,
    ext_ifname: str,
    listening_ip: str,
    lan_cidr: str,
    uuid: str,
    lease_file: str,
    http_port: int = 0,
    min_lifetime: int = 120,
    protocols: tuple[str, ...] = PORTMAP_PROTOCOLS,
) -> str:
    """A miniupnpd.conf: IGD + NAT-PMP + PCP, secure mode, maps allowed only for the LAN. ``min_lifetime``
    is the shortest PCP lease granted (shorter requests are raised to it; miniupnpd's default is 120 s)."""
    return f"""\
ext_ifname={ext_ifname}
listening_ip={listening_ip}
http_port={http_port}
enable_upnp={"yes" if "upnp" in protocols else "no"}
enable_natpmp={"yes" if "natpmp" in protocols or "pcp" in protocols else "no"}
secure_mode=yes
system_uptime=yes
notify_interval=60
clean_ruleset_interval=600
uuid={uuid}
lease_file={lease_file}
min_lifetime={min_lifetime}
max_lifetime=86400
upnp_table_name={MINIUPNPD_TABLE}
upnp_nat_table_name={MINIUPNPD_NAT_TABLE}
upnp_forward_chain={MINIUPNPD_FORWARD_CHAIN}
upnp_nat_chain={MINIUPNPD_NAT_CHAIN}
upnp_nat_postrouting_chain={MINIUPNPD_POSTROUTING_CHAIN}
allow 1024-65535 {lan_cidr} 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
"""
