"""A local aiohttp server that answers the storage-quota requests of analytics, for
Dropbox, Google Drive and Microsoft Graph, as each API answers them:

- `POST /{tag}/dropbox/2/users/get_space_usage` (body `null`, JSON, else 400):
  `{"used": N, "allocation": {".tag": "individual", "allocated": M}}`;
- `GET /{tag}/google/drive/v3/about?fields=storageQuota` (400 without the fields):
  `{"storageQuota": {"limit": "M", "usage": "N"}}` (Drive's digit strings);
- `GET /{tag}/graph/v1.0/me/drive`: `{"id": ..., "quota": {"total", "used", "remaining",
  "state"}}`.

`metadata(kind, tag)` is the provider `metadata` pointing the daemon here. Every bearer
token is answered with `usage` (used, allocated) unless `stale` lists it (401: the
token needs a refresh) or `limited` is set (429 with Retry-After: 1 for the next N).
`latency` delays each answer; `requests` records (tag, kind, token); `peak_by_tag` is
the most requests in flight per tag.

    python -m tests.support.quota_providers --latency 0.02   # prints "PORT <n>" (bench)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from aiohttp import web

from tests.support.local_server import LocalServer, serve_until_killed


class QuotaServer(LocalServer):
    shutdown_timeout = 0.5
    backlog = 1024

    def __init__(self, latency: float = 0.0, record: bool = True, port: int = 0) -> None:
        super().__init__(port)
        self.latency = latency
        self.record = record
        self.usage: tuple[int, int] = (3 * 2**30, 15 * 2**30)
        self.stale: set[str] = set()
        self.limited = 0
        self.requests: list[tuple[str, str, str | None]] = []
        self.count = 0
        self.in_flight: dict[str, int] = {}
        self.peak_by_tag: dict[str, int] = {}

    @property
    def url(self) -> str:
        return self.base_url

    def metadata(self, kind: str, tag: str | None = None) -> dict[str, Any]:
        base = f"{self.url}/{tag or kind}"
        if kind == "dropbox":
            return {"providerType": "dropbox", "apiBaseUrl": f"{base}/dropbox/2"}
        if kind == "google":
            return {"providerType": "google",
                    "quotaUrl": f"{base}/google/drive/v3/about?fields=storageQuota"}
        return {"providerType": "microsoft", "quotaUrl": f"{base}/graph/v1.0/me/drive"}

    async def _serve(self, request: web.Request, kind: str) -> web.Response:
        tag = request.match_info["tag"]
        auth = request.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else None
        self.count += 1
        if self.record:
            self.requests.append((tag, kind, token))
        self.in_flight[tag] = self.in_flight.get(tag, 0) + 1
        self.peak_by_tag[tag] = max(self.peak_by_tag.get(tag, 0), self.in_flight[tag])
        try:
            if self.latency:
                await asyncio.sleep(self.latency)
            return await self._answer(request, kind, token)
        finally:
            self.in_flight[tag] -= 1

    async def _answer(self, request: web.Request, kind: str,
                      token: str | None) -> web.Response:
        if kind == "dropbox":
            body = await request.read()
            if request.content_type != "application/json" or body.strip() != b"null":
                return web.Response(status=400, text="Error in call to API function "
                                    "\"users/get_space_usage\": bad request body")
        if kind == "google" and request.query.get("fields") != "storageQuota":
            return web.json_response({"error": {"code": 400, "message": "fields"}}, status=400)
        if self.limited:
            self.limited -= 1
            return web.json_response({"error": "too_many_requests"}, status=429,
                                     headers={"Retry-After": "1"})
        if token is None or token in self.stale:
            return web.json_response({"error": {"code": 401, "message": "Invalid Credentials",
                                                "status": "UNAUTHENTICATED"}}, status=401)
        used, allocated = self.usage
        if kind == "dropbox":
            return web.json_response({"used": used, "allocation": {
                ".tag": "individual", "allocated": allocated}})
        if kind == "google":
            return web.json_response({"storageQuota": {"limit": str(allocated),
                                                       "usage": str(used),
                                                       "usageInDrive": str(used)}})
        return web.json_response({"id": "b!drive", "driveType": "personal", "quota": {
            "total": allocated, "used": used, "remaining": allocated - used,
            "deleted": 0, "state": "normal"}})

    def routes(self, app: web.Application) -> None:
        async def dropbox(request: web.Request) -> web.Response:
            return await self._serve(request, "dropbox")

        async def google(request: web.Request) -> web.Response:
            return await self._serve(request, "google")

        async def graph(request: web.Request) -> web.Response:
            return await self._serve(request, "microsoft")

        app.router.add_post("/{tag}/dropbox/2/users/get_space_usage", dropbox)
        app.router.add_get("/{tag}/google/drive/v3/about", google)
        app.router.add_get("/{tag}/graph/v1.0/me/drive", graph)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Simulated storage-quota APIs")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0)
    args = parser.parse_args(argv)
    return serve_until_killed(QuotaServer(latency=args.latency, record=False, port=args.port))


if __name__ == "__main__":
    sys.exit(main())
