"""SSDP search for a UPnP Internet Gateway Device (UPnP Device Architecture 1.1 §1.3), pure code.

Why our own search rather than miniupnpc's ``discover()``: miniupnpc raises any discovery delay below a
second to one second (MX must be a whole number of seconds) and then waits that long for more answers
after the router's, so finding the router took 1.05 s in the lab although miniupnpd answered in 50 ms. The
port map, and so the direct path of a host whose router speaks only UPnP, waited for it. Here the first
valid answer ends the search; miniupnpc then reads the device description from its LOCATION
(``selectigd(url)``) and does the SOAP calls as before.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

MULTICAST = ("239.255.255.250", 1900)
PORT = 1900
#: what we search for: an IGD of either version, or the WAN connection services miniupnpc can drive
TARGETS = (
    "urn:schemas-upnp-org:device:InternetGatewayDevice:1",
    "urn:schemas-upnp-org:device:InternetGatewayDevice:2",
)
_ACCEPTED = (
    "urn:schemas-upnp-org:device:InternetGatewayDevice:",
    "urn:schemas-upnp-org:service:WANIPConnection:",
    "urn:schemas-upnp-org:service:WANPPPConnection:",
)
MAX_ANSWER = 2048  #: bytes; an answer is a few hundred


@dataclass(frozen=True, slots=True)
class Answer:
    """A device that answered our search: where its description is and what it says it is."""

    location: str  #: http URL of the root device description
    target: str  #: the ST header


def search(target: str, *, mx: int = 1) -> bytes:
    """An M-SEARCH for ``target`` (sent to :data:`MULTICAST`, or unicast to the gateway's port 1900)."""
    if not 1 <= mx <= 5 or any(c in target for c in "\r\n"):
        raise ValueError("MX is 1-5 seconds and the search target one line")
    return (
        "M-SEARCH * HTTP/1.1\r\n"
        f"HOST: {MULTICAST[0]}:{MULTICAST[1]}\r\n"
        'MAN: "ssdp:discover"\r\n'
        f"MX: {mx}\r\n"
        f"ST: {target}\r\n"
        "\r\n"
    ).encode("ascii")


def parse_answer(data: bytes, source_ip: str) -> Answer | None:
    """The gateway answer in ``data`` from ``source_ip``, or None for anything else.

    Only a ``200`` answer whose ST names an IGD or its WAN connection service and whose LOCATION is a plain
    http URL on the very address that answered is taken: anyone on the LAN can answer a multicast search,
    and the description fetch must not be pointed at some other host (miniupnpc itself does not check)."""
    if len(data) > MAX_ANSWER:
        return None
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return None
    lines = text.split("\r\n")
    status = lines[0].split(None, 2)
    if len(status) < 2 or not status[0].startswith("HTTP/1.") or status[1] != "200":
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            break
        name, sep, value = line.partition(":")
        if sep:
            headers.setdefault(name.strip().lower(), value.strip())
    target, location = headers.get("st", ""), headers.get("location", "")
    if not target.startswith(_ACCEPTED) or not _same_host(location, source_ip):
        return None
    return Answer(location=location, target=target)


def _same_host(url: str, source_ip: str) -> bool:
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
        same = host is not None and ipaddress.ip_address(host) == ipaddress.ip_address(source_ip)
    except ValueError:  # a bad port, a host name, an address that is none
        return False
    return parts.scheme == "http" and same and port != 0 and not any(c.isspace() for c in url)
