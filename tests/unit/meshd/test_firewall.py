"""nftables rules for the mesh interface (meshd.firewall): rendering, and nft accepting the script."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd import firewall
from meshd.proto.policy import InboundRule

A = ("100.64.0.1/32", "fd7a::1/128")


def test_table_is_named_after_the_interface() -> None:
    assert firewall.table_name("mesh0") == "meshd_mesh0"
    assert firewall.table_name("m-a.1") == "meshd_m_a_1"


def test_ssh_from_one_peer() -> None:
    script = firewall.render("mesh0", (InboundRule(A, "tcp", ((22, 22),)),))
    assert script.splitlines() == [
        "table inet meshd_mesh0",
        "delete table inet meshd_mesh0",
        "table inet meshd_mesh0 {",
        "\tchain prerouting {",
        "\t\ttype filter hook prerouting priority dstnat - 10; policy accept;",
        '\t\tiifname != "mesh0" accept',
        "\t\tct direction reply accept",
        "\t\tct state related accept",
        "\t\tip saddr { 100.64.0.1/32 } meta l4proto tcp tcp dport { 22 } accept",
        "\t\tip6 saddr { fd7a::1/128 } meta l4proto tcp tcp dport { 22 } accept",
        "\t\tcounter drop",
        "\t}",
        "}",
    ]


def test_protocols() -> None:
    assert firewall.rule_lines(InboundRule(("0.0.0.0/0",), "icmp")) == [
        "ip saddr { 0.0.0.0/0 } meta l4proto icmp accept"
    ]
    assert firewall.rule_lines(InboundRule(("::/0",), "icmp")) == [
        "ip6 saddr { ::/0 } meta l4proto ipv6-icmp accept"
    ]
    assert firewall.rule_lines(InboundRule(("10.0.0.0/8",), "any", ((80, 80), (8000, 8100)))) == [
        "ip saddr { 10.0.0.0/8 } tcp dport { 80, 8000-8100 } accept",
        "ip saddr { 10.0.0.0/8 } udp dport { 80, 8000-8100 } accept",
    ]
    assert firewall.rule_lines(InboundRule(("10.0.0.0/8",), "any")) == ["ip saddr { 10.0.0.0/8 } accept"]


def test_overlapping_sources_are_merged() -> None:
    rule = InboundRule(("100.64.0.0/24", "100.64.0.1/32", "100.64.1.0/24"), "udp")
    assert firewall.rule_lines(rule) == ["ip saddr { 100.64.0.0/23 } meta l4proto udp accept"]


def test_no_rules_drops_everything_but_replies() -> None:
    body = firewall.render("m0", ()).splitlines()
    assert body[5:9] == [
        '\t\tiifname != "m0" accept',
        "\t\tct direction reply accept",
        "\t\tct state related accept",
        "\t\tcounter drop",
    ]


nft = shutil.which("nft")
sources = st.lists(
    st.sampled_from(["100.64.0.1/32", "100.64.0.0/10", "fd7a::1/128", "0.0.0.0/0", "::/0", "10.1.2.3/32"]),
    max_size=4,
).map(tuple)
rules = st.lists(
    st.builds(
        InboundRule,
        sources=sources,
        proto=st.sampled_from(["tcp", "udp", "icmp", "any"]),
        ports=st.lists(st.tuples(st.integers(1, 100), st.integers(100, 65535)), max_size=3).map(tuple),
    ),
    max_size=4,
).map(tuple)


@pytest.mark.skipif(nft is None, reason="nft not installed")
@settings(max_examples=25, deadline=None)
@given(rules)
def test_nft_accepts_every_rendered_script(rs: tuple[InboundRule, ...]) -> None:
    rs = tuple(r if r.proto != "icmp" else InboundRule(r.sources, "icmp") for r in rs)
    done = subprocess.run(
        [nft or "nft", "-c", "-f", "-"], input=firewall.render("mtest0", rs), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


async def test_close_removes_the_table_even_when_an_update_was_cancelled_mid_nft(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 11: a stop cancels an update whose nft run goes on in its thread; the table it makes must
    not outlive the close (the removal is the last nft run, whatever order the threads run in)."""
    import asyncio
    import threading

    ran: list[str] = []
    in_nft, release = threading.Event(), threading.Event()

    def fake_nft(script: str, timeout: float = 10.0) -> None:
        if "delete table" in script and "{" not in script:
            ran.append("remove")
            return
        in_nft.set()
        release.wait(5)
        ran.append("install")

    monkeypatch.setattr(firewall, "run_nft", fake_nft)
    fw = firewall.Firewall("mtest0")
    update = asyncio.create_task(fw.update((InboundRule(A, "tcp", ((22, 22),)),)))
    await asyncio.to_thread(in_nft.wait, 5)
    update.cancel()
    closing = asyncio.create_task(fw.close())
    await asyncio.sleep(0.05)
    release.set()
    await closing
    assert ran == ["install", "remove"]
    assert fw.rules is None
    # an update that starts after close installs nothing
    with pytest.raises(firewall.FirewallError):
        await fw.update((InboundRule(A, "tcp", ((80, 80),)),))
    assert ran == ["install", "remove"]
