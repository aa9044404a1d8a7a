"""GET /metrics: Prometheus exposition of the daemon's own registry.

Who may scrape is `metrics.access`:
- "loopback" (default): only clients connecting from 127.0.0.1 / ::1 (any
  127.0.0.0/8 address, IPv4-mapped too), and only under a local `Host` name
  (`localhost`, a loopback address, or one of `metrics.hosts`): a web page whose
  name resolves to 127.0.0.1 (DNS rebinding) is refused. The TCP peer is what
  counts; X-Forwarded-For is not trusted, so a reverse proxy on the same host makes
  every client it forwards look local: use "token" behind a proxy;
- "token": `Authorization: Bearer <admin token>` (or a superadmin's JWT);
- "open": anyone.
Refusals use the MWAP envelope (401/403); the metrics themselves are text.
"""

from __future__ import annotations

import ipaddress

from aiohttp import web

from ..metrics import CONTENT_TYPE
from .envelope import ApiError
from .keys import AUTH, METRICS, SETTINGS

PATH = "/metrics"


def is_loopback(remote: str | None) -> bool:
    """Whether a peer address (`request.remote`) is the local host."""
    if not remote:
        return False  # a Unix socket or an unknown peer
    try:
        address = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def local_host_name(host: str, allowed: list[str]) -> bool:
    """Whether a `Host` header names this machine: localhost, a loopback address, or a
    name the operator listed (any port)."""
    name = host.strip().lower()
    if name.startswith("["):  # [::1]:8080
        name = name[1:].split("]", 1)[0]
    elif name.count(":") == 1:
        name = name.split(":", 1)[0]
    if name in ("localhost", "localhost.") or name in (h.lower() for h in allowed):
        return True
    return is_loopback(name)


async def metrics(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS].metrics
    access = settings.access
    if access == "loopback" and not is_loopback(request.remote):
        raise ApiError(403, "auth/forbidden",
                       "Metrics are served only to local clients (metrics.access = loopback).")
    host = request.headers.get("Host")  # browsers always send one; HTTP/1.0 tools may not
    if access == "loopback" and host is not None and not local_host_name(
            host, settings.hosts):
        raise ApiError(403, "auth/forbidden",
                       "Metrics are served only under a local host name (add it to "
                       "metrics.hosts).")
    if access == "token":
        await request.app[AUTH].require_admin(request)
    body = await request.app[METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def add_routes(app: web.Application) -> None:
    app.router.add_get(PATH, metrics)
