"""Which addresses a webhook may reach (server-side request forgery).

A tenant chooses the URL, so without a guard it could make the service call the
database, a cloud metadata endpoint or anything else on the private network.  The host
is resolved once; every address it resolves to must be public (no loopback, private,
carrier-grade NAT, link-local, multicast, reserved, documentation, unique-local or
site-local address, nor an IPv4-mapped, NAT64, 6to4 or Teredo form of one); and the
connection goes to the address that was checked, so a name that resolves to a public
address at the check and to a private one a moment later (DNS rebinding) cannot switch
it.  `allow` networks (TENANTRY_WEBHOOK_ALLOW_NETWORKS) are let through: development
and tests reach loopback that way.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult

from ..errors import Invalid

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# host -> the addresses it resolves to (a test injects its own)
Lookup = Callable[[str], Awaitable[list[str]]]

_EXTRA_FORBIDDEN: tuple[Network, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "100.64.0.0/10",  # carrier-grade NAT: private in practice
        "192.0.0.0/24",
        "198.18.0.0/15",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "fec0::/10",  # site-local (deprecated, still routed privately)
        "100::/64",
        "2001:db8::/32",
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class ForbiddenAddress(Exception):
    """The URL's host is, or resolves to, an address webhooks may not reach."""


def parse_networks(raw: str) -> tuple[Network, ...]:
    """`127.0.0.0/8, ::1` -> networks; ValueError naming the bad entry."""
    nets: list[Network] = []
    for item in (p.strip() for p in raw.split(",")):
        if not item:
            continue
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item[:60]!r} is not an IP network (CIDR)") from None
    return tuple(nets)


def _embedded_v4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr in _NAT64:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr.teredo is not None:
        return addr.teredo[1]
    return None


def forbidden(addr: Address) -> bool:
    """Whether `addr` is not a public unicast address (see the module's docstring)."""
    if isinstance(addr, ipaddress.IPv6Address):
        inner = _embedded_v4(addr)
        if inner is not None and forbidden(inner):
            return True
        if addr.ipv4_mapped is not None:
            return False  # a mapped public IPv4 address is that address
    return (
        not addr.is_global
        or addr.is_private
        or addr.is_loopback
        or addr.is_link_local
        or addr.is_multicast
        or addr.is_reserved
        or addr.is_unspecified
        or any(addr in net for net in _EXTRA_FORBIDDEN if net.version == addr.version)
    )


async def _system_lookup(host: str) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, None, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return [str(info[4][0]) for info in infos]


class Guard:
    def __init__(self, allow: Sequence[Network] = (), lookup: Lookup | None = None) -> None:
        self.allow = tuple(allow)
        self._lookup = lookup or _system_lookup

    def allowed(self, addr: Address) -> bool:
        return any(addr in net for net in self.allow if net.version == addr.version) or (
            not forbidden(addr)
        )

    def check_address(self, host: str, addr: Address) -> None:
        if not self.allowed(addr):
            raise ForbiddenAddress(
                f"{host} is {addr}, an address webhooks may not reach (loopback, private,"
                " link-local, multicast or reserved); TENANTRY_WEBHOOK_ALLOW_NETWORKS can"
                " allow it"
            )

    async def resolve(self, host: str) -> list[Address]:
        """The addresses of `host`, every one of them allowed; `ForbiddenAddress`
        otherwise, `OSError` when it does not resolve."""
        literal = ip_literal(host)
        if literal is not None:
            self.check_address(host, literal)
            return [literal]
        addrs = [ipaddress.ip_address(a.split("%", 1)[0]) for a in await self._lookup(host)]
        if not addrs:
            raise OSError(f"{host} resolves to no address")
        for addr in addrs:
            self.check_address(host, addr)
        return addrs

    async def check_url(self, url: str, field: str = "url", *, allow_http: bool = True) -> None:
        """At registration: the URL's form, then its host's addresses (`Invalid` naming
        `field` for either)."""
        host = url_host(url, field, allow_http=allow_http)
        try:
            await self.resolve(host)
        except ForbiddenAddress as exc:
            raise Invalid(field, str(exc)) from None
        except OSError:
            raise Invalid(field, f"the host {host[:100]} does not resolve") from None

    def resolver(self) -> AbstractResolver:
        """An aiohttp resolver that answers only allowed addresses: the connector then
        connects to exactly what was checked (and keeps the host name for `Host` and
        TLS)."""
        return _GuardedResolver(self)


def ip_literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def url_host(url: str, field: str = "url", *, allow_http: bool = True) -> str:
    """The host of a webhook URL; `Invalid` for anything but http(s)://host[:port]/path
    (no user or password in it, no fragment)."""
    if not isinstance(url, str) or not url.strip():
        raise Invalid(field, "must be an http(s) URL")
    if len(url) > 2000:
        raise Invalid(field, "must be at most 2000 characters")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise Invalid(field, "must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise Invalid(field, "is not a valid URL") from None
    schemes = ("https", "http") if allow_http else ("https",)
    if parts.scheme not in schemes:
        raise Invalid(
            field,
            "must be an https:// URL" if not allow_http else "must be an http:// or https:// URL",
        )
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise Invalid(field, "must not hold a user name or password")
    if parts.fragment:
        raise Invalid(field, "must not have a #fragment")
    host = parts.hostname or ""
    if not host:
        raise Invalid(field, "has no host")
    if port == 0:
        raise Invalid(field, "has port 0")
    literal = ip_literal(host)
    if literal is None and not all(
        label and len(label) <= 63 for label in host.rstrip(".").split(".")
    ):
        raise Invalid(field, "has an invalid host name")
    return host


class _GuardedResolver(AbstractResolver):
    def __init__(self, guard: Guard) -> None:
        self._guard = guard

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        addrs = await self._guard.resolve(host)
        return [
            ResolveResult(
                hostname=host,
                host=str(a),
                port=port,
                family=socket.AF_INET6 if a.version == 6 else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for a in addrs
        ]

    async def close(self) -> None:
        pass  # nothing held: each lookup is one getaddrinfo
