"""Telling the host about the resolver: ``meshd up --dns auto|resolved|hosts|off``.

- ``resolved``: register the resolver as the mesh interface's per-link DNS server with the routing-only
  domain ``~<domain>`` (split DNS: systemd-resolved sends only names under the mesh domain to it, every
  other name keeps going to the host's own servers) and take the link out of the default route for DNS.
  Done with ``resolvectl`` (systemd-resolved's own client, which speaks its D-Bus API), undone with
  ``resolvectl revert`` on stop (the link's removal drops it too). /etc/resolv.conf is never touched.
  The hosts block is not written.
- ``hosts``: the hosts block (meshd.hosts), as before; the resolver still answers on its address.
- ``auto``: ``resolved`` when systemd-resolved runs on this host and takes the link, else ``hosts``
  (a network namespace where resolved cannot see the interface falls back too).
- ``off``: no resolver, no hosts block, nothing registered.

The command lines are pure functions (unit-tested); :func:`run` is the small subprocess shell.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

log = logging.getLogger("meshd.dns")

RESOLVED_SOCKET = Path("/run/systemd/resolve/io.systemd.Resolve")  #: exists while resolved runs
COMMAND_TIMEOUT = 5.0


class DnsSetupError(Exception):
    """systemd-resolved did not take the configuration."""


def resolved_running(socket_path: Path | None = None) -> bool:
    """systemd-resolved is running here (its varlink socket exists) and resolvectl is installed."""
    return (socket_path or RESOLVED_SOCKET).exists() and shutil.which("resolvectl") is not None


def register_commands(interface: str, server: str, domain: str) -> list[list[str]]:
    """What makes `server` the link's DNS server for ``~<domain>`` only (split DNS)."""
    return [
        ["resolvectl", "dns", interface, server],
        ["resolvectl", "domain", interface, f"~{domain}"],
        ["resolvectl", "default-route", interface, "false"],
    ]


def revert_commands(interface: str) -> list[list[str]]:
    return [["resolvectl", "revert", interface]]


def effective_mode(mode: str, resolved: bool) -> str:
    """The mode to try first: ``auto`` is ``resolved`` where it runs, else ``hosts``."""
    if mode == "auto":
        return "resolved" if resolved else "hosts"
    return mode


async def run(commands: list[list[str]], within: float = COMMAND_TIMEOUT) -> None:
    """Run each command in turn; DnsSetupError with its stderr's first line when one fails."""
    for argv in commands:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
            )
        except OSError as e:
            raise DnsSetupError(f"{argv[0]}: {e.strerror or e}") from None
        try:
            async with asyncio.timeout(within):
                _, err = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise DnsSetupError(f"{' '.join(argv)}: no answer within {within:.0f} s") from None
        if proc.returncode != 0:
            first = (err or b"").decode("utf-8", "replace").strip().splitlines()
            raise DnsSetupError(f"{' '.join(argv)}: {first[0] if first else f'exit {proc.returncode}'}")


async def register(interface: str, server: str, domain: str) -> None:
    await run(register_commands(interface, server, domain))
    log.info("systemd-resolved: %s answers ~%s on %s", server, domain, interface)


async def revert(interface: str) -> None:
    await run(revert_commands(interface))
