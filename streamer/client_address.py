"""The client's address as the access log shows it: behind trusted proxies (nginx,
a load balancer), the address they report in X-Forwarded-For rather than theirs.

As nginx's realip module with `real_ip_recursive on`: starting from the peer, while
the address at hand is a trusted proxy's, the next one is the entry it appended
(X-Forwarded-For read from the right). An entry that is not an IP address stops the
walk at the proxy that passed it on.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

LOOPBACK: tuple[Network, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)


def client_address(peer: str, forwarded_for: Iterable[str], trusted: tuple[Network, ...]) -> str:
    """`peer` (the socket's address; empty over a Unix socket, which only local
    processes reach and is trusted) or the client it forwards for; "-" if unknown."""
    hops = [hop.strip() for header in forwarded_for for hop in header.split(",")]
    address = peer
    while _trusted(address, trusted) and hops:
        hop = hops.pop()
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            break
        address = hop
    return address or "-"


def _trusted(address: str, trusted: tuple[Network, ...]) -> bool:
    if not address:
        return True  # a Unix socket
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in trusted)
