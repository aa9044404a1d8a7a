"""Where mwapjobs may send credentials: outbound URLs are policy, not data.

A provider's `tokenUrl`, `metadata.healthCheckUrl` and `metadata.apiBaseUrl` come from
the shared database. Whoever can change them would receive the platform's client
secret and tenants' refresh and access tokens, so before any request that carries a
credential, `UrlPolicy.refusal` checks the URL:

- `https` only. Plain `http`, and hosts outside the allow-lists, only to loopback
  addresses (127.0.0.0/8, ::1, localhost) and only with `outbound.allow_loopback`
  (tests and local development);
- the host must be on the allow-list of the provider's kind: for Google, Dropbox
  and Microsoft the hosts of their public APIs by default (`KNOWN_HOSTS`), or what
  `outbound.hosts.<kind>` says; other kinds accept any host unless
  `outbound.hosts.generic` lists some. An entry starting with "." allows a domain
  and its subdomains;
- never a cloud metadata address (169.254.0.0/16, fd00:ec2::254,
  metadata.google.internal), whatever the lists say (the unit also denies
  169.254.169.254 at the kernel).
A refused URL is a configuration problem of the provider: its tenants are not blamed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from urllib.parse import urlsplit

KNOWN_HOSTS: dict[str, tuple[str, ...]] = {
    "google": ("oauth2.googleapis.com", "www.googleapis.com", ".googleapis.com",
               "accounts.google.com"),
    "dropbox": ("api.dropboxapi.com", "content.dropboxapi.com", "api.dropbox.com",
                ".dropboxapi.com"),
    "microsoft": ("login.microsoftonline.com", "graph.microsoft.com",
                  ".microsoftonline.com"),
}
METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata", "instance-data"})
_METADATA_NETS = (ipaddress.ip_network("169.254.0.0/16"),
                  ipaddress.ip_network("fd00:ec2::254/128"))


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_loopback_host(host: str) -> bool:
    if host in ("localhost", "localhost."):
        return True
    address = _address(host)
    return address is not None and address.is_loopback


def _listed(host: str, allowed: Sequence[str]) -> bool:
    for entry in allowed:
        entry = entry.lower()
        if entry.startswith(".") and (host.endswith(entry) or host == entry[1:]):
            return True
        if host == entry:
            return True
    return False


class UrlPolicy:
    def __init__(self, hosts: Mapping[str, Sequence[str]] | None = None, *,
                 allow_loopback: bool = False) -> None:
        self._hosts = {k.lower(): tuple(v) for k, v in (hosts or {}).items()}
        self.allow_loopback = allow_loopback

    def allowed_hosts(self, kind: str) -> tuple[str, ...] | None:
        """The hosts a provider of `kind` may be reached at; None for any host."""
        if kind in self._hosts:
            return self._hosts[kind]
        return KNOWN_HOSTS.get(kind)

    def refusal(self, url: str, kind: str) -> str | None:
        """Why a credential must not be sent to `url`, or None if it may."""
        try:
            parts = urlsplit(url)
            host = (parts.hostname or "").lower()
            parts.port  # noqa: B018 - raises for a malformed port
        except ValueError:
            return "not a valid URL"
        if parts.scheme not in ("https", "http") or not host:
            return "not an http(s) URL with a host"
        address = _address(host)
        if host in METADATA_HOSTS or (address is not None and any(
                address in net for net in _METADATA_NETS)):
            return f"{host} is a cloud metadata address"
        if is_loopback_host(host):
            if self.allow_loopback:
                return None
            return f"{host} is this machine: allowed only with outbound.allow_loopback"
        if parts.scheme != "https":
            return "plain http: credentials are sent over https only"
        allowed = self.allowed_hosts(kind)
        if allowed is not None and not _listed(host, allowed):
            return (f"{host} is not an allowed host for {kind} providers "
                    f"(outbound.hosts.{kind}: {', '.join(allowed) or 'none'})")
        return None
