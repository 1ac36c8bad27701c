"""The client's address as the access log shows it: behind trusted proxies (nginx,
a load balancer), the address they report in X-Forwarded-For rather than theirs.

As nginx's realip module with `real_ip_recursive on`: starting from the peer, while
the address at hand is a trusted proxy's, the next one is the entry it appended
(X-Forwarded-For read from the right). An entry that is not a plain IP address (a
zone id is text of the sender's choosing) stops the walk at the proxy that passed it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

LOOPBACK: tuple[Network, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)
# Proxies in a row that are looked through: a longer list (a header of thousands of
# trusted addresses) would cost the event loop milliseconds per request.
MAX_HOPS = 16


def client_address(peer: str, forwarded_for: Iterable[str], trusted: tuple[Network, ...]) -> str:
    """`peer` (the socket's address; empty over a Unix socket, which only local
    processes reach and is trusted) or the client it forwards for; "-" if unknown."""
    if not _trusted(peer, trusted):
        return peer
    hops = [hop for header in forwarded_for for hop in header.split(",")]
    address = peer
    for hop in reversed(hops[-MAX_HOPS:]):
        ip = _address(hop.strip())
        if ip is None:
            break
        address = str(ip)
        if not _trusted(address, trusted):
            break
    return address or "-"


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if "%" in text:  # a zone id
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _trusted(address: str, trusted: tuple[Network, ...]) -> bool:
    if not address:
        return True  # a Unix socket
    ip = _address(address)
    if ip is None:
        return False
    # An IPv4 address reaches an IPv6 socket mapped (::ffff:a.b.c.d); either form may
    # be the one configured.
    other: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    if isinstance(ip, ipaddress.IPv6Address):
        other = ip.ipv4_mapped
    else:
        other = ipaddress.IPv6Address(f"::ffff:{ip}")
    return any(ip in network or (other is not None and other in network) for network in trusted)
