"""The HTTP server's defences against hostile or broken clients.

aiohttp serves the app; this module decides what a connection may cost:
- **idle and slow connections**: `http.idle_timeout` (aiohttp's keep-alive timeout,
  which also runs from the moment a connection opens) closes a connection that has not
  completed a request's headers in that time, or sits idle between requests;
- **a connection cap**: at most `http.max_connections` at once. A new connection
  beyond it pushes out the oldest one that is not in the middle of a request (a
  slow or idle client), or, if every one is busy, is closed at once: cheap, and
  `/healthz` stays reachable while hundreds of idle sockets are held open;
- **malformed requests** (a header or URL over aiohttp's limits, garbage instead of
  HTTP) get MWAP's error envelope and one rate-limited warning, never a traceback;
- **accept errors** (out of file descriptors) are logged at most every 10 s.
The process's file-descriptor limit (`LimitNOFILE` in the unit) stays well above the
cap, so outbound requests (token refresh, probes, alerts) and MongoDB keep working
however many clients pile up.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from .envelope import HTTP_CODES

log = logging.getLogger(__name__)
LOG_EVERY = 10.0  # seconds between log lines about the same kind of trouble


class _Throttle:
    """At most one log line per kind per LOG_EVERY seconds, with how many were held."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def allow(self, kind: str) -> int | None:
        now = time.monotonic()
        if now - self._last.get(kind, -LOG_EVERY) < LOG_EVERY:
            self._held[kind] = self._held.get(kind, 0) + 1
            return None
        self._last[kind] = now
        return self._held.pop(kind, 0)


_throttle = _Throttle()


class _Handler(RequestHandler):
    """aiohttp's connection handler, counted and answering protocol errors in MWAP's
    envelope."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self._manager
        if isinstance(server, GuardedServer) and not server.admit(self):
            transport.close()
            return
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        server = self._manager
        if isinstance(server, GuardedServer):
            server.forget(self)
        super().connection_lost(exc)

    @property
    def busy(self) -> bool:
        return bool(self._request_in_progress)

    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        held = _throttle.allow(f"bad-request-{status}")
        if held is not None:
            log.warning("malformed request refused", extra={
                "status": status, "error": type(exc).__name__ if exc else None,
                "remote": request.remote, "notLogged": held})
        if request.writer.output_size > 0:
            raise ConnectionError("the response was sent already")
        code, text = HTTP_CODES.get(status, ("server/internal-error",
                                             "Something went wrong on our side."))
        if status == 400:
            code, text = "http/bad-request", "The request could not be read as HTTP."
        body = {"success": False, "error": {"code": code, "message": text}}
        response = web.Response(status=status, text=json.dumps(body),
                                content_type="application/json")
        response.force_close()
        return response


class GuardedServer(web.Server):
    """aiohttp's Server with `_Handler` connections and a cap on how many live at once."""

    max_connections = 256

    def __call__(self) -> RequestHandler:
        return _Handler(self, loop=self._loop, **self._kwargs)

    def admit(self, handler: _Handler) -> bool:
        live: OrderedDict[_Handler, None] = self.__dict__.setdefault("_live", OrderedDict())
        if len(live) >= self.max_connections:
            idle = next((h for h in live if not h.busy), None)
            held = _throttle.allow("connection-cap")
            if held is not None:
                log.warning("connection cap reached", extra={
                    "maxConnections": self.max_connections, "notLogged": held,
                    "action": "closed the oldest idle connection" if idle
                    else "refused a new connection"})
            if idle is None:
                return False
            live.pop(idle)
            idle.force_close()
        live[handler] = None
        return True

    def forget(self, handler: _Handler) -> None:
        self.__dict__.get("_live", {}).pop(handler, None)


class GuardedRunner(web.AppRunner):
    """An AppRunner whose server is a `GuardedServer`."""

    def __init__(self, app: web.Application, *, max_connections: int, idle_timeout: float,
                 **kwargs: Any) -> None:
        super().__init__(app, keepalive_timeout=idle_timeout, **kwargs)
        self._max_connections = max_connections

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = GuardedServer  # same state; our handlers and the cap
        server.max_connections = self._max_connections  # type: ignore[attr-defined]
        return server


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Log asyncio's own errors (an accept failing for want of descriptors, say) as one
    line per kind every LOG_EVERY s instead of a traceback each time."""
    default = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message") or "asyncio error")
        exc = context.get("exception")
        if "accept" not in message:  # not ours to quieten
            if default is not None:
                default(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        held = _throttle.allow(message)
        if held is not None:
            log.error(message, extra={"error": f"{type(exc).__name__}: {exc}" if exc else None,
                                      "notLogged": held})

    loop.set_exception_handler(handler)
