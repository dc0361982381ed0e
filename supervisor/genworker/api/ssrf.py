"""Outbound requests to addresses a tenant chose: refuse this host's own network.

A provider's answer (or, later, a tenant's webhook) names a URL; fetching it blindly
lets whoever controls that URL make this host call its loopback, its private network or
the cloud metadata service. `AddressPolicy` says which addresses may be reached: public
unicast ones, plus what the operator's allow-list names. It is applied twice:

- `GuardedResolver` filters every DNS answer at connect time, so a name that resolves
  to a public address when checked and to 127.0.0.1 when connected (DNS rebinding)
  still cannot reach loopback: aiohttp connects to what the resolver returned;
- `check_url` checks a literal IP before the request (aiohttp never asks a resolver for
  one, so `http://127.0.0.1/` would pass a resolver alone).

Redirects are the caller's to follow, each hop checked (see `api/openai.py`).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from genworker.config import ConfigError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

REFUSED = "address not allowed"

# Named although the checks below cover them: these are the addresses an attacker wants.
METADATA = (ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254"))


class AddressRefused(OSError):
    """The policy refuses every address of this host (aiohttp wraps it in a connector error)."""


def blocked(ip: IPAddress) -> bool:
    """Loopback, private, link-local, metadata, unspecified, multicast or reserved: not an
    address a tenant's URL may make us call. IPv4 inside IPv6 is judged as IPv4."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if inner is not None and blocked(inner):
            return True
    return (
        ip in METADATA
        or ip.is_multicast
        or ip.is_unspecified
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_private
        or ip.is_reserved
        or not ip.is_global
    )


@dataclass(frozen=True)
class _Entry:
    host: str | None = None  # a host name, lower-case
    net: Network | None = None  # an address or a CIDR
    port: int | None = None  # None: any port


def _parse_entry(text: str) -> _Entry:
    port: int | None = None
    host = text
    if text.startswith("["):  # [v6] or [v6]:port
        inside, _, rest = text[1:].partition("]")
        host = inside
        if rest:
            if not rest.startswith(":"):
                raise ValueError(text)
            port = int(rest[1:])
    elif text.count(":") == 1:  # host:port or v4:port (a bare v6 has several colons)
        host, _, port_text = text.partition(":")
        port = int(port_text)
    if port is not None and not 0 < port < 65536:
        raise ValueError(text)
    try:
        return _Entry(net=ipaddress.ip_network(host, strict=False), port=port)
    except ValueError:
        pass
    if not host or "/" in host or any(c.isspace() for c in host):
        raise ValueError(text)
    return _Entry(host=host.lower().rstrip("."), port=port)


class AddressPolicy:
    """Public addresses pass; an allow-list entry lets a private one through.

    Entries (comma-separated): a host name (`images.internal`), an address or CIDR
    (`10.1.2.3`, `10.0.0.0/8`, `fd00::/8`), each optionally with a port
    (`localhost:8080`, `127.0.0.1:9000`, `[::1]:9000`): with one, only that port.
    """

    def __init__(self, allow: str = "") -> None:
        entries = [e.strip() for e in allow.split(",") if e.strip()]
        try:
            self.entries = tuple(_parse_entry(e) for e in entries)
        except ValueError as e:
            raise ConfigError(
                f"--fetch-allow: expected host[:port], address[:port] or CIDR, got {e.args[0]!r}"
            ) from None

    def host_allowed(self, host: str, port: int) -> bool:
        """The operator named this host (by name) for this port: any address it has is fine."""
        name = host.lower().rstrip(".")
        return any(e.host == name and e.port in (None, port) for e in self.entries)

    def address_allowed(self, host: str, port: int, ip: IPAddress) -> bool:
        if self.host_allowed(host, port):
            return True
        for e in self.entries:
            if e.net is not None and ip in e.net and e.port in (None, port):
                return True
        return not blocked(ip)


def literal_ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


def check_url(url: str, policy: AddressPolicy) -> None:
    """AddressRefused when the URL names a literal IP the policy refuses (or no host)."""
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        raise AddressRefused(REFUSED)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise AddressRefused(REFUSED) from None
    ip = literal_ip(host)
    if ip is not None and not policy.address_allowed(host, port, ip):
        raise AddressRefused(REFUSED)


class GuardedResolver(AbstractResolver):
    """A resolver that returns only the addresses the policy allows; AddressRefused when
    none is left. Wraps aiohttp's default resolver (or `inner`, for tests)."""

    def __init__(self, policy: AddressPolicy, inner: AbstractResolver | None = None) -> None:
        self.policy = policy
        self.inner = inner or DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self.inner.resolve(host, port, family)
        kept = [r for r in found if self._allowed(host, port, r)]
        if not kept:
            raise AddressRefused(REFUSED)
        return kept

    def _allowed(self, host: str, port: int, result: ResolveResult) -> bool:
        ip = literal_ip(str(result["host"]))
        return ip is not None and self.policy.address_allowed(host, port, ip)

    async def close(self) -> None:
        await self.inner.close()


def guarded_connector(policy: AddressPolicy, **kwargs: Any) -> aiohttp.TCPConnector:
    """A TCPConnector whose every name lookup goes through `GuardedResolver`."""
    return aiohttp.TCPConnector(resolver=GuardedResolver(policy), **kwargs)
