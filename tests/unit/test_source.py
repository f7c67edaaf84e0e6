"""Finding the client's address behind proxies (no I/O)."""

from __future__ import annotations

from ipaddress import ip_address, ip_network

import pytest

from consumer.source import Source, SourceCheck, forwarded_entries, parse_address

ALLOWED = [ip_network("34.247.197.22"), ip_network("2001:db8::/32")]


def check(peer: str, lines: list[str], *, hops: int = 1, trust: bool = True) -> Source:
    source = SourceCheck(ALLOWED, trust_forwarded_for=trust, trusted_proxy_hops=hops)
    return source.check(peer, lines)


def test_entries_of_every_line_in_order() -> None:
    assert forwarded_entries(["a, b", " ", "c,,d "]) == ["a", "b", "c", "d"]


@pytest.mark.parametrize(
    ("entry", "address"),
    [
        ("34.247.197.22", "34.247.197.22"),
        ("34.247.197.22:51234", "34.247.197.22"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("2001:db8::1", "2001:db8::1"),
        ("::ffff:34.247.197.22", "34.247.197.22"),
    ],
)
def test_addresses_are_read_with_or_without_a_port(entry: str, address: str) -> None:
    assert parse_address(entry) == ip_address(address)


@pytest.mark.parametrize("entry", ["unknown", "proxy.internal", "", "[::1", "1.2.3.4:x:y"])
def test_what_is_not_an_address_reads_as_none(entry: str) -> None:
    assert parse_address(entry) is None


def test_the_client_is_the_entry_as_many_hops_from_the_right_as_trusted() -> None:
    assert check("10.0.0.1", ["6.6.6.6", "34.247.197.22"]) is Source.ALLOWED
    assert check("10.0.0.1", ["34.247.197.22", "6.6.6.6"]) is Source.OUTSIDE
    assert check("10.0.0.1", ["34.247.197.22", "6.6.6.6, 10.0.0.5"], hops=2) is Source.OUTSIDE
    assert check("10.0.0.1", ["6.6.6.6", "34.247.197.22, 10.0.0.5"], hops=2) is Source.ALLOWED


def test_too_few_entries_or_no_address_there_is_a_bad_forwarded_for() -> None:
    assert check("10.0.0.1", ["34.247.197.22"], hops=2) is Source.BAD_FORWARDED_FOR
    assert check("10.0.0.1", ["34.247.197.22, unknown"]) is Source.BAD_FORWARDED_FOR


def test_without_the_header_or_without_trust_the_peer_is_the_client() -> None:
    assert check("34.247.197.22", []) is Source.ALLOWED
    assert check("::ffff:34.247.197.22", []) is Source.ALLOWED
    assert check("10.0.0.1", ["34.247.197.22"], trust=False) is Source.OUTSIDE
    assert check("34.247.197.22", ["6.6.6.6"], trust=False) is Source.ALLOWED
    assert check("not-an-address", []) is Source.OUTSIDE
