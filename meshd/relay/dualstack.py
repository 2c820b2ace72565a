"""Which URLs reach a relay region, in order (issue 15: IPv6-only nodes).

A region's URL often names an IPv4 address literal (a lab, a coordinator without DNS). A node without
IPv4 cannot reach it; when the map gives the region's IPv6 address, the same URL with that address as its
host reaches the same relay. A URL with a DNS name needs no second URL: resolving it yields the IPv6
address too, and the connection tries it. (With https and an address literal, the relay's certificate
must name the IPv6 address as well.)
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit, urlunsplit

from meshd.proto.netmap import RelayRegion


def relay_urls(region: RelayRegion) -> list[str]:
    """The region's URL, then the IPv6 one when the URL names an IPv4 address and the region has IPv6."""
    urls = [region.url]
    if not region.ipv6:
        return urls
    try:
        u = urlsplit(region.url)
        host, port = u.hostname or "", u.port
        ipaddress.IPv4Address(host)
    except ValueError:  # a DNS name, an IPv6 literal, or a URL that will fail on its own
        return urls
    netloc = f"[{region.ipv6}]" + (f":{port}" if port is not None else "")
    urls.append(urlunsplit((u.scheme, netloc, u.path, u.query, u.fragment)))
    return urls
