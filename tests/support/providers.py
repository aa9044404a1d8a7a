"""A local aiohttp server that plays the provider APIs the health checks probe.

One server answers for any number of simulated providers; each is a *tag* in
the path, so per-provider limits can be observed:

- dropbox: `POST /{tag}/dropbox/2/users/get_current_account`; like the real API it
  answers 400 unless `Content-Type` is `application/json` and the body is `null`;
- google: `GET /{tag}/google/drive/v3/about?fields=user` (400 without `fields`);
- microsoft: `GET /{tag}/graph/v1.0/me/drive`;
- generic: `GET /{tag}/generic/api`.

`metadata(kind, tag)` gives the provider `metadata` that points the daemon at
these routes (`apiBaseUrl` for Dropbox as in MWAP, `healthCheckUrl` for the
others, `apiBaseUrl` for a generic provider).

Every bearer token is accepted unless told otherwise: `reply(token, Reply...)`
sets how a token is answered from now on, `script(token, *replies)` queues
one-off answers used first, and `default` answers tokens nobody configured
(e.g. tokens issued by the OAuth server after a refresh). `Reply` has a
constructor for each case of the health rules: `ok`, `unauthorized` (the
provider's own 401 body), `suspended` (Dropbox `user_suspended`), `forbidden`,
`rate_limited_403` (Google `userRateLimitExceeded`), `error(500)`, `slow(s)`,
`hang()` (until `release()`, `reset()` or `stop()`), `wrong_json()`,
`not_json()` and `redirect(location)`. Each body has the shape the real
provider uses for that error.

`latency` delays every answer (the benchmark's 20 ms). The server records
every request (`requests`: tag, kind, token, method, content type, body,
arrival and completion on `time.monotonic()`), the requests in flight and
their peak, overall and per tag, and serves the same as JSON on `GET /_stats`
(`POST /_reset` clears them) for use from another process:

    python -m tests.support.providers --port 0 --latency 0.02   # prints "PORT <n>"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

from tests.support.local_server import LocalServer, serve_until_killed

Kind = Literal["dropbox", "google", "microsoft", "generic"]
KINDS: tuple[Kind, ...] = ("dropbox", "google", "microsoft", "generic")


@dataclass(frozen=True)
class Reply:
    """How to answer one probe. `body=None` means the provider's own body for `status`."""

    status: int = 200
    body: Any = None
    delay: float = 0.0
    hang: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    raw: str | None = None  # sent as text instead of JSON
    code: str | None = None  # the provider's error code for an automatic body

    @classmethod
    def ok(cls) -> Reply:
        return cls()

    @classmethod
    def unauthorized(cls) -> Reply:
        return cls(401)

    @classmethod
    def suspended(cls) -> Reply:
        return cls(401, code="user_suspended")

    @classmethod
    def forbidden(cls) -> Reply:
        return cls(403)

    @classmethod
    def rate_limited_403(cls) -> Reply:
        return cls(403, code="userRateLimitExceeded")

    @classmethod
    def error(cls, status: int = 500) -> Reply:
        return cls(status)

    @classmethod
    def slow(cls, seconds: float) -> Reply:
        return cls(delay=seconds)

    @classmethod
    def hang_forever(cls) -> Reply:
        return cls(hang=True)

    @classmethod
    def wrong_json(cls) -> Reply:
        return cls(200, body={"unexpected": True})

    @classmethod
    def not_json(cls) -> Reply:
        return cls(200, raw="<html><body>Please sign in</body></html>")

    @classmethod
    def redirect(cls, location: str, status: int = 302) -> Reply:
        return cls(status, headers={"Location": location}, raw="")


@dataclass
class Probe:
    tag: str
    kind: Kind
    method: str
    path: str
    query: str
    token: str | None
    content_type: str | None
    body: bytes
    arrived: float
    finished: float | None = None
    status: int | None = None


class ProviderServer(LocalServer):
    """The simulated provider APIs; an async context manager (`start`/`stop` too)."""

    shutdown_timeout = 0.5
    backlog = 1024

    def __init__(self, latency: float = 0.0, host: str = "127.0.0.1", port: int = 0,
                 record: bool = True) -> None:
        super().__init__(port)
        self.latency = latency
        self.host = host
        self.record = record
        self.default = Reply.ok()
        self.requests: list[Probe] = []
        self.in_flight = 0
        self.peak = 0
        self.in_flight_by_tag: dict[str, int] = {}
        self.peak_by_tag: dict[str, int] = {}
        self.starts_by_tag: dict[str, list[float]] = {}
        self.count = 0
        self._replies: dict[str, Reply] = {}
        self._scripts: dict[str, deque[Reply]] = {}
        self._release = asyncio.Event()

    @property
    def url(self) -> str:
        return self.base_url

    # -- lifecycle ----------------------------------------------------------------------

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/{tag}/dropbox/2/users/get_current_account", self._dropbox)
        app.router.add_get("/{tag}/google/drive/v3/about", self._google)
        app.router.add_get("/{tag}/graph/v1.0/me/drive", self._microsoft)
        app.router.add_get("/{tag}/generic/{rest:.*}", self._generic)
        app.router.add_get("/_stats", self._stats)
        app.router.add_post("/_reset", self._reset)

    def stopping(self) -> None:
        self.release()

    # -- configuration ----------------------------------------------------------------------

    def metadata(self, kind: Kind, tag: str | None = None) -> dict[str, Any]:
        """Provider `metadata` that points the probes of `kind` at this server."""
        tag = tag or kind
        base = f"{self.url}/{tag}"
        if kind == "dropbox":
            return {"providerType": "dropbox", "apiBaseUrl": f"{base}/dropbox/2"}
        if kind == "google":
            return {"providerType": "google",
                    "healthCheckUrl": f"{base}/google/drive/v3/about?fields=user"}
        if kind == "microsoft":
            return {"providerType": "microsoft", "healthCheckUrl": f"{base}/graph/v1.0/me/drive"}
        return {"providerType": "test", "apiBaseUrl": f"{base}/generic/api"}

    def reply(self, token: str, reply: Reply) -> None:
        """Answer `token` with `reply` from now on."""
        self._replies[token] = reply

    def script(self, token: str, *replies: Reply) -> None:
        """One-off answers for `token`, used in order before its standing reply."""
        self._scripts.setdefault(token, deque()).extend(replies)

    def release(self) -> None:
        """Let every hanging request finish (with 504)."""
        self._release.set()
        self._release = asyncio.Event()

    def reset(self) -> None:
        self.release()
        self.default = Reply.ok()
        self._replies.clear()
        self._scripts.clear()
        self.clear_stats()

    def clear_stats(self) -> None:
        self.requests = []
        self.peak = self.in_flight
        self.peak_by_tag = dict(self.in_flight_by_tag)
        self.starts_by_tag = {}
        self.count = 0

    # -- what was seen ------------------------------------------------------------------------

    def tokens_seen(self, tag: str | None = None) -> list[str | None]:
        return [p.token for p in self.requests if tag is None or p.tag == tag]

    def max_rate(self, tag: str, window: float = 1.0) -> int:
        """The most requests of `tag` that started within any `window` seconds."""
        starts = sorted(self.starts_by_tag.get(tag, []))
        best, low = 0, 0
        for high, t in enumerate(starts):
            while t - starts[low] >= window:
                low += 1
            best = max(best, high - low + 1)
        return best

    def stats(self) -> dict[str, Any]:
        return {"count": self.count, "peak": self.peak, "peakByTag": self.peak_by_tag,
                "maxRateByTag": {tag: self.max_rate(tag) for tag in self.starts_by_tag}}

    # -- the routes -----------------------------------------------------------------------------

    async def _dropbox(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "dropbox")

    async def _google(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "google")

    async def _microsoft(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "microsoft")

    async def _generic(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "generic")

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _reset(self, request: web.Request) -> web.Response:
        self.clear_stats()
        return web.json_response({"ok": True})

    async def _serve(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        arrived = time.monotonic()
        tag = request.match_info["tag"]
        body = await request.read()
        auth = request.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else None
        probe = Probe(tag, kind, request.method, request.path, request.query_string, token,
                      request.headers.get("Content-Type"), body, arrived)
        self.count += 1
        if self.record:
            self.requests.append(probe)
        self.starts_by_tag.setdefault(tag, []).append(arrived)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        self.in_flight_by_tag[tag] = self.in_flight_by_tag.get(tag, 0) + 1
        self.peak_by_tag[tag] = max(self.peak_by_tag.get(tag, 0), self.in_flight_by_tag[tag])
        try:
            response = await self._answer(kind, probe)
        finally:
            self.in_flight -= 1
            self.in_flight_by_tag[tag] -= 1
            probe.finished = time.monotonic()
        probe.status = response.status
        return response

    async def _answer(self, kind: Kind, probe: Probe) -> web.StreamResponse:
        if self.latency:
            await asyncio.sleep(self.latency)
        if kind == "dropbox" and (probe.content_type or "").split(";")[0] != "application/json":
            return web.Response(status=400, text="Error in call to API function "
                                "\"users/get_current_account\": Bad HTTP \"Content-Type\" header")
        if kind == "dropbox" and probe.body.strip() != b"null":
            return web.Response(status=400, text="Error in call to API function "
                                "\"users/get_current_account\": request body: could not decode "
                                "input as JSON")
        if kind == "google" and "fields=user" not in probe.query:
            return web.json_response({"error": {"code": 400, "message": "fields required"}},
                                     status=400)
        if probe.token is None:
            return self._build(kind, Reply.unauthorized())
        script = self._scripts.get(probe.token)
        reply = (script.popleft() if script else None) or self._replies.get(probe.token,
                                                                            self.default)
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.hang:
            await self._release.wait()
            return web.Response(status=504, text="released")
        return self._build(kind, reply)

    def _build(self, kind: Kind, reply: Reply) -> web.Response:
        headers = dict(reply.headers)
        if reply.raw is not None:
            return web.Response(status=reply.status, text=reply.raw, headers=headers,
                                content_type=None if "Content-Type" in headers else "text/html")
        body = reply.body if reply.body is not None else _body(kind, reply.status, reply.code)
        return web.Response(status=reply.status, text=json.dumps(body), headers=headers,
                            content_type="application/json")


def _body(kind: Kind, status: int, code: str | None) -> Any:
    """What the real provider sends for `status` (and error `code`)."""
    if status < 300:
        return {
            "dropbox": {"account_id": "dbid:AAH4f99T0taONIb-OurWxbNQ6ywGRopQngc",
                        "name": {"display_name": "Franz Ferdinand"},
                        "email": "franz@example.com"},
            "google": {"user": {"kind": "drive#user", "displayName": "Franz Ferdinand",
                                "emailAddress": "franz@example.com"}},
            "microsoft": {"id": "b!t18F8ybsHUq1z3LTz8xvZqP8zaSWjkFNhsME-Fepo75dTf9vQKfeRb",
                          "driveType": "business", "owner": {"user": {"displayName": "Franz"}}},
            "generic": {"ok": True},
        }[kind]
    if kind == "dropbox":
        tag = code or {401: "expired_access_token", 403: "invalid_account_type",
                       429: "too_many_requests"}.get(status, "internal_error")
        return {"error_summary": f"{tag}/..", "error": {".tag": tag}}
    if kind == "google":
        reason, state = {401: ("authError", "UNAUTHENTICATED"),
                         403: ("insufficientPermissions", "PERMISSION_DENIED"),
                         429: ("rateLimitExceeded", "RESOURCE_EXHAUSTED")}.get(
            status, ("backendError", "INTERNAL"))
        if code:
            reason = code
        return {"error": {"code": status, "message": f"{reason} ({status})",
                          "errors": [{"domain": "global", "reason": reason,
                                      "message": reason}], "status": state}}
    if kind == "microsoft":
        graph = code or {401: "InvalidAuthenticationToken", 403: "accessDenied",
                         429: "TooManyRequests"}.get(status, "generalException")
        return {"error": {"code": graph, "message": f"{graph} ({status})",
                          "innerError": {"request-id": "00000000-0000-0000-0000-000000000000"}}}
    return {"error": code or f"http_{status}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Simulated provider APIs for health checks")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per answer")
    args = parser.parse_args(argv)
    return serve_until_killed(ProviderServer(latency=args.latency, port=args.port,
                                             record=False))


if __name__ == "__main__":
    sys.exit(main())
