"""The client's address, checked against the optional allowlist (``ALLOWED_NETWORKS``).

Without ``TRUST_FORWARDED_FOR`` the client is the peer of the TCP connection. Behind
proxies it is read from ``X-Forwarded-For``: every line of that header, joined in order
(a proxy may append its own line, as HAProxy's ``option forwardfor`` does, rather than
extend the client's), is a list of addresses each proxy appended to. Only the entries our
own proxies appended can be trusted, and they are the rightmost ones: the client is the
entry ``TRUSTED_PROXY_HOPS`` from the right. Everything left of it is whatever the client
chose to send. A request without the header is judged by its peer; one whose header holds
fewer entries than the hops, or no address at that entry, did not come through the
proxies as configured and is refused (:attr:`Source.BAD_FORWARDED_FOR`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from enum import Enum
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network


class Source(Enum):
    """What the allowlist says about a request."""

    ALLOWED = "allowed"
    OUTSIDE = "outside"
    """The client's address is not in the allowlist (or the peer's is unreadable)."""
    BAD_FORWARDED_FOR = "bad_forwarded_for"
    """``X-Forwarded-For`` holds fewer entries than the trusted hops, or no address there."""


class SourceCheck:
    """The allowlist of one application and how to find the client's address."""

    def __init__(
        self,
        networks: Sequence[Network],
        *,
        trust_forwarded_for: bool,
        trusted_proxy_hops: int,
    ) -> None:
        self.networks = tuple(networks)
        self.trust_forwarded_for = trust_forwarded_for
        self.hops = trusted_proxy_hops

    @property
    def enabled(self) -> bool:
        return bool(self.networks)

    def check(self, peer: str | None, forwarded_for: Iterable[str]) -> Source:
        """Judge a request by its peer address and its ``X-Forwarded-For`` lines."""
        address: Address | None
        entries = forwarded_entries(forwarded_for) if self.trust_forwarded_for else []
        if entries:
            if len(entries) < self.hops:
                return Source.BAD_FORWARDED_FOR
            address = parse_address(entries[-self.hops])
            if address is None:
                return Source.BAD_FORWARDED_FOR
        else:
            address = parse_address(peer or "")
        if address is None or not any(address in network for network in self.networks):
            return Source.OUTSIDE
        return Source.ALLOWED


def forwarded_entries(lines: Iterable[str]) -> list[str]:
    """The entries of every ``X-Forwarded-For`` line, in order; empty ones dropped."""
    return [entry.strip() for line in lines for entry in line.split(",") if entry.strip()]


def parse_address(entry: str) -> Address | None:
    """An IP address, also written with a port (``a.b.c.d:p``, ``[v6]:p``) as some proxies
    append it; an IPv4-mapped IPv6 address (``::ffff:a.b.c.d``, as a dual-stack listener
    sees it) as IPv4. ``None`` when it is not an address (``unknown``, a host name...)."""
    if entry.startswith("[") and "]" in entry:
        entry = entry[1 : entry.index("]")]
    elif entry.count(":") == 1:
        entry = entry.split(":", 1)[0]
    try:
        address = ip_address(entry)
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def client_fields(peer: str | None, forwarded: Sequence[str]) -> dict[str, object]:
    """A refused request's log fields: ``client`` (the peer's address) and, when sent,
    ``forwarded_for`` (every ``X-Forwarded-For`` line joined, cut to 200 characters)."""
    fields: dict[str, object] = {"client": peer}
    if joined := ", ".join(forwarded):
        fields["forwarded_for"] = joined[:200]
    return fields
