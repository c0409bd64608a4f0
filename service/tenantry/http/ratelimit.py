"""Per-client token buckets for the public sign-up endpoint.

In process memory: each process behind a load balancer limits on its own, so the
effective limit is per process.  Good enough to turn away a client hammering the
endpoint; not an accounting system.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable


class RateLimiter:
    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_clients: int = 100_000,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self._max = max_clients
        self._now = now
        # client -> (tokens, at); least recently seen first, so the oldest go first when
        # the table is full (a flood of distinct addresses cannot grow memory).
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def check(self, client: str) -> float:
        """Take a token: 0.0 when allowed, else the seconds until one is available."""
        now = self._now()
        tokens, at = self._buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[client] = (tokens, now)
        if len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
        return wait

    @staticmethod
    def retry_after(wait: float) -> str:
        return str(max(1, math.ceil(wait)))


Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


def parse_networks(raw: str) -> Networks:
    """`10.0.0.0/8, 127.0.0.1` -> networks (a bare address is a /32 or /128)."""
    return tuple(ipaddress.ip_network(p.strip(), strict=False) for p in raw.split(",") if p.strip())


def _trusted(address: str, proxies: Networks) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in proxies)


def client_address(remote: str | None, forwarded_for: str | None, proxies: Networks) -> str:
    """The client a limit applies to.  Behind trusted proxies (TENANTRY_TRUSTED_PROXIES)
    it is the right-most X-Forwarded-For hop that is not one of them: hops to the left
    of it are whatever the client chose to send, and could be anything."""
    if remote is None:
        return "unknown"
    if not forwarded_for or not _trusted(remote, proxies):
        return remote
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, proxies):
            return hop
    return hops[0] if hops else remote


def limit_key(address: str, ipv6_prefix: int = 64) -> str:
    """What a rate limit counts an address as: an IPv4 address itself (an IPv4-mapped
    IPv6 address included), an IPv6 address by its network of `ipv6_prefix` bits.  A
    subscriber is usually given a whole /64 and can use any address in it: keyed on the
    full address, 1,000 sign-ups from one /64 were all accepted."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, ipv6_prefix), strict=False))
    return str(ip)
