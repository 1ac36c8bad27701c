"""The address the access log shows behind proxies (X-Forwarded-For, read from the
right while the hop at hand is a trusted proxy)."""

from __future__ import annotations

import ipaddress

import pytest

from streamer.client_address import LOOPBACK, MAX_HOPS, client_address

PRIVATE = (*LOOPBACK, ipaddress.ip_network("10.0.0.0/8"))


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "shown"),
    [
        ("203.0.113.9", [], "203.0.113.9"),  # no proxy
        (
            "203.0.113.9",
            ["198.51.100.1"],
            "203.0.113.9",
        ),  # not a trusted proxy: its claim is not taken
        ("127.0.0.1", [], "127.0.0.1"),  # a trusted proxy that forwards for nobody
        ("127.0.0.1", ["198.51.100.1"], "198.51.100.1"),
        (
            "127.0.0.1",
            ["1.1.1.1, 198.51.100.1"],
            "198.51.100.1",
        ),  # the client's own claim stays out
        ("127.0.0.1", ["1.1.1.1, 198.51.100.1, 10.0.0.7"], "198.51.100.1"),  # two proxies
        ("127.0.0.1", ["1.1.1.1", "198.51.100.1"], "198.51.100.1"),  # two headers, in order
        ("127.0.0.1", ["10.0.0.7, 10.0.0.8"], "10.0.0.7"),  # all trusted: the first
        ("127.0.0.1", ["198.51.100.1, not-an-address"], "127.0.0.1"),  # stops at its proxy
        ("127.0.0.1", ["2001:db8::1"], "2001:db8::1"),
        ("::1", ["198.51.100.1"], "198.51.100.1"),
        ("::ffff:127.0.0.1", ["198.51.100.1"], "198.51.100.1"),  # IPv4 on an IPv6 socket
        ("", ["198.51.100.1"], "198.51.100.1"),  # a Unix socket: a local proxy
        ("", [], "-"),
        # A zone id is text of the sender's choosing: never written to the log.
        ("127.0.0.1", ['fe80::1%x" 200 0 0.000s "forged'], "127.0.0.1"),
        ("127.0.0.1", ["198.51.100.1, fe80::1%eth0"], "127.0.0.1"),
        ("127.0.0.1", ["2001:DB8:0:0::1"], "2001:db8::1"),  # written as an address is
    ],
)
def test_the_client_behind_trusted_proxies(peer: str, forwarded_for: list[str], shown: str) -> None:
    assert client_address(peer, forwarded_for, PRIVATE) == shown


def test_nothing_is_trusted_without_a_network() -> None:
    assert client_address("127.0.0.1", ["198.51.100.1"], ()) == "127.0.0.1"


def test_a_long_chain_of_trusted_proxies_is_looked_through_only_so_far() -> None:
    chain = ", ".join(f"10.0.{n // 250}.{n % 250}" for n in range(2000))
    assert client_address("127.0.0.1", ["198.51.100.1, " + chain], PRIVATE) == "10.0.7.234"
    assert MAX_HOPS == 16  # 2000 - 16 = 1984: 10.0.7.234


def test_a_trusted_network_may_be_written_as_ipv4_mapped() -> None:
    mapped = (ipaddress.ip_network("::ffff:10.0.0.0/104"),)
    assert client_address("10.1.2.3", ["198.51.100.1"], mapped) == "198.51.100.1"
    assert client_address("::ffff:10.1.2.3", ["198.51.100.1"], mapped) == "198.51.100.1"
