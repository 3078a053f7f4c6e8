"""Browser origins and Host names the HTTP ports accept.

Ollama's rules, which clients and browsers already live with: a request that
carries an `Origin` must come from an allowed origin (the node's own, or
localhost / 127.0.0.1 / [::1] on any port, plus `api.cors_origins`), or it is
refused before it has any effect; a request without `Origin` (curl, SDKs) is
not a browser's and passes. While a port binds a loopback address, the `Host`
header must name a loopback host too, so a DNS name rebound to 127.0.0.1 gets
nowhere (`api.allowed_hosts` adds names).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from urllib.parse import urlsplit

LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost", "ip6-loopback"})
WILDCARD_BINDS = frozenset({"", "0.0.0.0", "::", "[::]"})


def is_loopback_host(host: str) -> bool:
    """`host` (no port; IPv6 with or without brackets) names this machine's loopback."""
    h = host.strip().lower().strip("[]")
    if h in LOOPBACK_NAMES or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def interface_addresses() -> set[str]:
    """This machine's IP addresses, as an Origin would spell them."""
    import psutil

    out: set[str] = set()
    try:
        for addrs in psutil.net_if_addrs().values():
            for a in addrs:
                if a.family in (socket.AF_INET, socket.AF_INET6):
                    out.add(a.address.split("%", 1)[0].lower())
    except (OSError, RuntimeError):
        pass
    return out


def split_host(value: str) -> str:
    """The host part of a Host header value (`name:port`, `[::1]:8080`), lower case."""
    v = value.strip().lower()
    if v.startswith("["):
        end = v.find("]")
        return v[1:end] if end > 0 else v
    if v.count(":") == 1:
        return v.split(":", 1)[0]
    return v  # a bare IPv6 address or a bare name


def normalize_origin(origin: str) -> str | None:
    """`scheme://host[:port]` in lower case with the default port dropped; None when unparseable."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    if not parts.scheme or not parts.hostname:
        return None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    scheme = parts.scheme.lower()
    if port is None or (scheme, port) in (("http", 80), ("https", 443)):
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


@dataclass
class OriginPolicy:
    """What one listening port accepts. `own_hosts` are names this node is
    reached by (its bind address, host name, FQDN); `ports` are its HTTP ports,
    whose origins are its own."""

    bind_host: str
    ports: list[int]
    cors_origins: list[str] = field(default_factory=list)
    allowed_hosts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.any_origin = "*" in self.cors_origins
        self.extra_origins = {o for o in (normalize_origin(c) for c in self.cors_origins if c != "*") if o}
        own = {self.bind_host.strip("[]").lower()} - WILDCARD_BINDS
        if self.bind_host in WILDCARD_BINDS or not is_loopback_host(self.bind_host):
            for name in (socket.gethostname(), socket.getfqdn()):
                own.add(name.lower())
        if self.bind_host in WILDCARD_BINDS:
            own |= interface_addresses()  # a dashboard opened as http://192.0.2.7:8081
        self.own_hosts = own
        self.allowed = {split_host(h) for h in self.allowed_hosts if h.strip()}
        self.loopback_bind = self.bind_host not in WILDCARD_BINDS and is_loopback_host(self.bind_host)

    def origin_allowed(self, origin: str) -> bool:
        if self.any_origin:
            return True
        norm = normalize_origin(origin)
        if norm is None:
            return False  # "null" (sandboxed frames, file://) and garbage
        if norm in self.extra_origins:
            return True
        parts = urlsplit(norm)
        if parts.scheme not in ("http", "https"):
            return False
        host = (parts.hostname or "").lower()
        if is_loopback_host(host):
            return True
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return (host in self.own_hosts or host in self.allowed) and port in self.ports

    def host_allowed(self, host_header: str | None) -> bool:
        if not host_header:
            return True  # HTTP/1.0 without Host: not a browser, nothing to rebind
        host = split_host(host_header)
        if is_loopback_host(host) or host in self.allowed:
            return True
        if self.loopback_bind:
            return False
        if not self.allowed:
            return True
        return host in self.own_hosts
