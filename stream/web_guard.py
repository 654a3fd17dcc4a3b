"""Which requests `agestream serve`'s web app refuses before any route runs: a `Host` that is
not this server (DNS rebinding), an `Origin` of another site on a request that changes
something (cross-site requests), and such a request without a JSON body."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

# Names every loopback server answers to, whatever address it is bound to.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
JSON_TYPE = "application/json"
DEFAULT_PORTS = {"http": 80, "https": 443}
# A host name or IPv4 address, or a bracketed IPv6 literal, with an optional port.
HOST_PATTERN = r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::(\d{1,5}))?$"
_HOST = re.compile(HOST_PATTERN)


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or "localhost") is this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def split_host(value: str) -> tuple[str, int | None] | None:
    """(lower-case name, port or None) of a `Host` header or `serve.allowed_hosts` entry;
    IPv6 addresses keep their brackets. None when it is not a host."""
    match = _HOST.match(value.strip())
    if match is None:
        return None
    port = None if match[2] is None else int(match[2])
    return match[1].lower(), port


def _url_name(host: str) -> str:
    """A bind address as a `Host` header names it: IPv6 in brackets, lower case."""
    host = host.lower()
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


@dataclass(frozen=True)
class HostPolicy:
    """The `Host` values a server accepts: its loopback names and bind address on its own
    port, and the hosts the user listed (any port unless the entry names one). `any_host`
    accepts every `Host`: a server bound beyond loopback (it has a token) with none listed.
    """

    names: frozenset[str]
    listed: tuple[tuple[str, int | None], ...]
    any_host: bool

    @classmethod
    def for_server(
        cls, host: str, token: str | None, allowed_hosts: Iterable[str] = ()
    ) -> HostPolicy:
        """The policy of a server bound to `host`; ValueError for an entry that is no host."""
        listed = []
        for entry in allowed_hosts:
            parsed = split_host(entry)
            if parsed is None:
                raise ValueError(
                    f"allowed host {entry!r} is not a host name or address (with an optional "
                    ":port), e.g. camera-box.local or 192.168.1.20:8080"
                )
            listed.append(parsed)
        any_host = bool(token) and not is_loopback(host) and not listed
        return cls(frozenset({*LOOPBACK_NAMES, _url_name(host)}), tuple(listed), any_host)

    def allows(self, host_header: str | None, port: int) -> bool:
        """Whether a request to this server's `port` may name `host_header` as its Host."""
        if self.any_host:
            return True
        parsed = split_host(host_header or "")
        if parsed is None:
            return False
        name, given = parsed
        given = DEFAULT_PORTS["http"] if given is None else given
        if name in self.names and given == port:
            return True
        return any(name == entry and wanted in (None, given) for entry, wanted in self.listed)


def _same_origin(origin: str, host_header: str | None) -> bool:
    """Whether `origin` (scheme://host[:port]) is the site the request was sent to."""
    parts = urlsplit(origin)
    default = DEFAULT_PORTS.get(parts.scheme.lower())
    site, host = split_host(parts.netloc), split_host(host_header or "")
    if default is None or site is None or host is None or parts.path not in ("", "/"):
        return False
    return (site[0], site[1] or default) == (host[0], host[1] or default)


def refusal(
    method: str, headers: Mapping[str, str], port: int, policy: HostPolicy
) -> tuple[int, str] | None:
    """(status, one-line message) when a request must be refused, else None.

    Args:
        method: the request's method.
        headers: its headers (case-insensitive mapping).
        port: the port of the server socket it came in on.
        policy: the hosts this server answers to.
    """
    host = headers.get("Host")
    if not policy.allows(host, port):
        shown = "none" if host is None else repr(host[:100])
        return 403, (
            f"Host {shown} is not this server: open it by the address it listens on, or list "
            "the name in serve.allowed_hosts (--allowed-host)"
        )
    if method in SAFE_METHODS:
        return None
    origin = headers.get("Origin")
    if origin is not None and not _same_origin(origin, host):
        return 403, f"cross-site request refused: Origin {origin[:100]!r} is another site"
    content_type = headers.get("Content-Type")
    if (method == "POST" or content_type is not None) and _mime(content_type) != JSON_TYPE:
        shown = "none" if content_type is None else repr(content_type[:100])
        return 415, f"Content-Type must be {JSON_TYPE}, got {shown}"
    return None


def _mime(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()
