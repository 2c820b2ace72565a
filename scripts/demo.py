"""scripts/demo: the mesh in a namespace lab, end to end, with a short summary (run as root)."""

from __future__ import annotations

import json
import signal
import sys
import time

from rich.console import Console
from rich.table import Table

from tests.eventually import eventually
from tests.netns.lab import Host, Lab
from tests.netns.mesh import Mesh, Node

console = Console()


def step(text: str) -> None:
    console.print(f"[bold cyan]>[/] {text}")


def lan_ping(node: Node, ip: str, wait: float = 1.0) -> bool:
    return node.host.run(["ping", "-n", "-c", "1", "-W", str(wait), ip], timeout=5).returncode == 0


def subnet_router(
    mesh: Mesh,
    results: list[tuple[str, bool, str]],
    laptop: Node,
    cloud: Node,
    phone: Node,
    nas: Host,
    lan: str,
) -> None:
    """The NAS on the laptop's home LAN, reached from the cloud host through the laptop (a subnet router)."""
    step(f"subnet router: coordinator routes list (the laptop offers {lan}; nobody uses it until approved)")

    def listing() -> str:  # the offer went out at start, so the first call normally has it
        out = mesh.admin("routes", "list").stdout
        return out if lan in out else ""

    try:
        console.print(
            eventually(listing, within=10, what="the laptop's offer reaches the coordinator").rstrip()
        )
    except Exception as e:  # the demo reports instead of crashing
        console.print(f"[red]{e}")

    step(f"a policy: the demo's nodes reach each other; only the cloud host may use {lan}; approve the route")
    policy = mesh.dir / "policy.toml"
    policy.write_text(
        f'[[rules]]\nsrc = ["user:demo"]\ndst = ["user:demo:*"]\n\n'
        f'[[rules]]\nsrc = ["node:cloud"]\ndst = ["{lan}:*"]\n'
    )
    console.print(policy.read_text().rstrip(), markup=False)  # "[[rules]]" is not markup
    mesh.admin("policy", "set", str(policy))
    t0 = time.monotonic()
    mesh.admin("routes", "approve", "laptop", lan)
    try:
        eventually(
            lambda: lan_ping(cloud, nas.ip, wait=0.3),
            within=10,
            interval=0.05,
            what=f"cloud pings nas {nas.ip}",
        )
        ok = True
    except Exception as e:  # the demo reports instead of crashing
        ok = False
        console.print(f"[red]{e}")
    took = time.monotonic() - t0
    console.print(f"  cloud: ping {nas.ip} (nas, no meshd) through the laptop: {'ok' if ok else 'FAILED'}")
    results.append(("cloud pings nas (LAN, no meshd) via laptop", ok, f"{took:.1f} s after approval"))

    step("sshd on nas; from cloud: ssh to it (the NAS sees the laptop's LAN address: masqueraded)")
    ssh_key = mesh.start_sshd(nas)
    r = mesh.ssh(cloud, nas.ip, "ip netns identify; echo from $SSH_CLIENT", ssh_key)
    console.print((r.stdout or r.stderr).rstrip())
    words = r.stdout.split()
    ok = r.returncode == 0 and nas.ns in words and laptop.host.ip in words
    results.append(("ssh nas through the subnet router", ok, ""))

    refused = not lan_ping(phone, nas.ip)
    verdict = "fails (no route to it, as it should)" if refused else "PASSES (wrong)"
    console.print(f"  phone (no rule for {lan}): ping {nas.ip} {verdict}")
    results.append(("phone may not reach nas (policy)", refused, ""))


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    results: list[tuple[str, bool, str]] = []
    t_start = time.monotonic()
    with Lab() as lab, Mesh(lab) as mesh:
        step(
            "building the lab: a public server, a laptop behind a home NAT, a public cloud host, and a phone"
        )
        step(
            "behind a carrier's endpoint-dependent NAT (no direct path to a home NAT: it will use the relay)"
        )
        server = lab.server(name="coord")
        home = lab.host(nat="eim", name="laptop")
        cloud = lab.host(nat="public", name="cloud")
        phone_h = lab.host(nat="edm", name="phone")
        assert home.router is not None
        nas = lab.host(router=home.router, name="nas")  # on the laptop's home LAN; runs no meshd
        home_lan = str(home.router.lan_net)
        console.print(lab.describe())

        step(f"starting the coordinator on {server.ip}:8080")
        mesh.start_coordinator(server)
        mesh.admin("users", "create", "demo")
        key = mesh.admin("keys", "create", "--user", "demo", "--reusable").stdout.split()[-1]
        console.print(f"  coordinator keys create --user demo --reusable  ->  key {key[:8]}… (shown once)")

        step("meshd up on the three hosts (each enrolls with the pre-auth key)")
        step(f"the laptop also offers its home LAN as a subnet router: --advertise-routes {home_lan}")
        t0 = time.monotonic()
        laptop = mesh.up(home, "laptop", key=key, wait=False, extra=("--advertise-routes", home_lan))
        cloud_n = mesh.up(cloud, "cloud", key=key, wait=False)
        # the phone keeps no hosts block: its names come only from meshd's resolver (see below)
        phone_hosts = ("--hosts-file", str(mesh.dir / "phone-hosts"))
        phone = mesh.up(phone_h, "phone", key=key, wait=False, extra=phone_hosts)
        for n in (laptop, cloud_n, phone):
            mesh.wait_ready(n)
        mesh.wait_peer(laptop, "cloud")
        mesh.wait_peer(cloud_n, "laptop")
        mesh.wait_peer(laptop, "phone")
        t_up = time.monotonic() - t0
        results.append(("three daemons up and seeing each other", True, f"{t_up:.1f} s"))

        step("coordinator nodes list")
        console.print(mesh.admin("nodes", "list").stdout.rstrip())

        t0 = time.monotonic()
        ok = True
        try:
            mesh.wait_ping(laptop, cloud_n, within=10)
            mesh.wait_ping(cloud_n, laptop, within=10)
        except Exception as e:  # the demo reports instead of crashing
            ok = False
            console.print(f"[red]{e}")
        results.append(("ping both ways over WireGuard", ok, f"{time.monotonic() - t0:.1f} s"))
        for a, b, want in ((laptop, cloud_n, "direct"), (phone, cloud_n, "direct"), (laptop, phone, "relay")):
            try:
                took = mesh.wait_path(a, b.name, want, within=15)
                mesh.wait_ping(a, b, within=5)
                ok = True
            except Exception as e:  # the demo reports instead of crashing
                ok, took = False, 0.0
                console.print(f"[red]{e}")
            results.append((f"{a.name} -> {b.name}: {want}", ok, f"{took:.1f} s"))

        step("meshd status (on laptop, behind the NAT)")
        console.print(mesh.meshd(laptop, "status").stdout.rstrip())
        step("meshd ping cloud")
        out = mesh.meshd(laptop, "ping", "cloud", check=False)
        console.print((out.stdout or out.stderr).rstrip())
        results.append(("meshd ping cloud", out.returncode == 0, out.stdout.strip().split(" in ")[-1]))

        step("meshd netcheck (on the phone, behind the endpoint-dependent NAT)")
        console.print(mesh.meshd(phone, "netcheck", check=False).stdout.rstrip())

        step("/etc/hosts on laptop (meshd's block)")
        console.print(mesh.hosts_block(laptop).rstrip())

        step("sshd on cloud; from laptop: ssh cloud hostname / ip netns identify")
        ssh_key = mesh.start_sshd(cloud)
        r = mesh.ssh(laptop, "cloud", "hostname; ip netns identify", ssh_key)
        console.print((r.stdout or r.stderr).rstrip())
        results.append(("ssh cloud (by name, over the mesh)", r.returncode == 0 and cloud.ns in r.stdout, ""))

        step("the resolver on 100.100.100.100: from phone, dig cloud.mesh, then ssh cloud through DNS only")
        # resolv.conf stands in for systemd-resolved's ~mesh routing (meshd up --dns resolved does that)
        (mesh._hosts_file(phone_h).parent / "resolv.conf").write_text(
            "nameserver 100.100.100.100\nsearch mesh\n"
        )
        answer = phone_h.run(["dig", "@100.100.100.100", "+short", "cloud.mesh"]).stdout.strip()
        console.print(f"  dig @100.100.100.100 cloud.mesh  ->  {answer}")
        r = mesh.ssh(phone, "cloud", "hostname; ip netns identify", ssh_key)
        console.print((r.stdout or r.stderr).rstrip())
        ok = answer == mesh.overlay_ip(cloud_n) and r.returncode == 0 and cloud.ns in r.stdout
        results.append(("ssh cloud through the mesh resolver", ok, ""))

        subnet_router(mesh, results, laptop, cloud_n, phone, nas, home_lan)

        doc = mesh.status(laptop)
        console.print_json(json.dumps(doc))

    table = Table(title="meshvpn demo", show_header=True)
    table.add_column("check")
    table.add_column("result")
    table.add_column("figure")
    for what, ok, fig in results:
        table.add_row(what, "[green]ok[/]" if ok else "[red]FAILED[/]", fig)
    console.print(table)
    console.print(f"everything torn down; demo took {time.monotonic() - t_start:.1f} s")
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: lab torn down")
        sys.exit(130)
