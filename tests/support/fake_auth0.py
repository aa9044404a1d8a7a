"""A local Auth0 for the owner-email tests: the token endpoint and the users endpoint of
the Management API, as an aiohttp server on 127.0.0.1.

    async with FakeAuth0(client_id="m2m", client_secret="s3cret") as auth0:
        auth0.users["auth0|alice"] = {"email": "alice@example.com", "email_verified": True,
                                      "name": "Alice"}
        auth0.rate_limit(times=1, retry_after="2")   # the next users request answers 429
        auth0.url                                     # notifications.auth0_url
        auth0.token_requests, auth0.user_requests    # what was asked

Like Auth0: `POST /oauth/token` wants `grant_type=client_credentials`, the client's id
and secret, and the audience `{url}/api/v2/` (else 401 `access_denied`); it issues
tokens valid `token_lifetime` seconds. `GET /api/v2/users/{id}` wants one of them as a
bearer token (else 401), answers 404 for an unknown user, and 429 with `Retry-After`
(or `X-RateLimit-Reset`) when told to.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from aiohttp import web

from tests.support.local_server import LocalServer


class FakeAuth0(LocalServer):
    def __init__(self, client_id: str = "m2m-client", client_secret: str = "m2m-s3cret",
                 token_lifetime: int = 86400) -> None:
        super().__init__()
        self.client_id = client_id
        self.client_secret = client_secret
        self.token_lifetime = token_lifetime
        self.users: dict[str, dict[str, Any]] = {}
        self.tokens: dict[str, float] = {}  # token -> expiry (time.time)
        self.token_requests: list[dict[str, Any]] = []
        self.user_requests: list[tuple[str, str | None]] = []  # (user id, bearer token)
        self._limits: list[dict[str, str]] = []

    @property
    def url(self) -> str:
        return self.base_url

    def rate_limit(self, times: int = 1, retry_after: str | None = "1",
                   reset: float | None = None) -> None:
        headers = {}
        if retry_after is not None:
            headers["Retry-After"] = retry_after
        if reset is not None:
            headers["X-RateLimit-Reset"] = str(int(reset))
        self._limits.extend([headers] * times)

    def revoke_tokens(self) -> None:
        self.tokens.clear()

    async def _token(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.token_requests.append(body)
        if (body.get("grant_type") != "client_credentials"
                or body.get("client_id") != self.client_id
                or body.get("client_secret") != self.client_secret
                or body.get("audience") != f"{self.url}/api/v2/"):
            return web.json_response({"error": "access_denied",
                                      "error_description": "Unauthorized"}, status=401)
        token = "eyJ" + secrets.token_urlsafe(24)
        self.tokens[token] = time.time() + self.token_lifetime
        return web.json_response({"access_token": token, "token_type": "Bearer",
                                  "expires_in": self.token_lifetime, "scope": "read:users"})

    async def _user(self, request: web.Request) -> web.Response:
        user_id = request.match_info["id"]
        auth = request.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else None
        self.user_requests.append((user_id, token))
        if self._limits:
            return web.json_response({"statusCode": 429, "error": "Too Many Requests",
                                      "message": "Global limit has been reached"},
                                     status=429, headers=self._limits.pop(0))
        if token is None or self.tokens.get(token, 0) < time.time():
            return web.json_response({"statusCode": 401, "error": "Unauthorized",
                                      "message": "Invalid token"}, status=401)
        user = self.users.get(user_id)
        if user is None:
            return web.json_response({"statusCode": 404, "error": "Not Found",
                                      "message": "The user does not exist.",
                                      "errorCode": "inexistent_user"}, status=404)
        return web.json_response({"user_id": user_id, **user})

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/oauth/token", self._token)
        app.router.add_get("/api/v2/users/{id}", self._user)
