"""A tenant owner's address, from the Auth0 Management API.

MWAP stores no email: `tenants.ownerId` is an Auth0 `sub`. With a machine-to-machine
client (the backend's `AUTH0_CLIENT_ID`/`AUTH0_CLIENT_SECRET`, or
`notifications.client_id`/`client_secret`) granted `read:users`:

- `POST {base}/oauth/token` with the client-credentials grant and the audience
  `{base}/api/v2/`: a token, kept until `TOKEN_MARGIN` seconds before it expires (one
  fetch at a time: concurrent look-ups share it);
- `GET {base}/api/v2/users/{sub}?fields=email,email_verified,name` with it.

Everything Auth0 answers is untrusted: only an `email` that looks like one address (no
spaces, no line breaks that could add a header, one `@`) and `email_verified: true`
(the boolean, not a string) is used; `name` is cut and stripped of control characters.
A 429 says when to come back (`Retry-After`, in seconds or as a date, else
`X-RateLimit-Reset`, a Unix time): `RateLimited` carries the wait. An unknown user is
`NotFound`; anything else (5xx, network, a refused client) is `Unavailable`, for the
caller to retry. The request goes through the outbound policy (kind `auth0`); the
client secret and tokens never appear in a log line or an error.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

import aiohttp

from ...logs import secrets
from ...outbound import UrlPolicy

TOKEN_MARGIN = 60.0  # seconds before its expiry a cached token is no longer used
MAX_WAIT = 3600.0  # the longest rate-limit wait taken from an answer
_EMAIL = re.compile(r"^[^@\s\x00-\x1f\x7f<>,;\"]{1,64}@[A-Za-z0-9.-]{1,253}\.[A-Za-z]{2,63}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Found:
    email: str
    name: str | None


@dataclass(frozen=True)
class Unusable:
    """The user exists but gives us no address to use (unverified, none, malformed)."""

    reason: str


@dataclass(frozen=True)
class NotFound:
    reason: str = "no such user in Auth0"


@dataclass(frozen=True)
class RateLimited:
    retry_after: float


@dataclass(frozen=True)
class Unavailable:
    reason: str


Lookup = Found | Unusable | NotFound | RateLimited | Unavailable


def mask_email(address: str) -> str:
    """`f***@example.com`: enough to tell addresses apart in a log, not to use one."""
    local, at, domain = address.partition("@")
    if not at:
        return "***"
    return f"{local[:1]}***@{domain}"


def retry_after(headers: Mapping[str, str], now: float | None = None) -> float:
    """Seconds to wait after a 429: `Retry-After` (seconds or an HTTP date), else
    `X-RateLimit-Reset` (a Unix time); 1 to MAX_WAIT, 60 when the answer says nothing."""
    now = time.time() if now is None else now
    value = headers.get("Retry-After", "").strip()
    wait: float | None = None
    if value:
        try:
            wait = float(value)
        except ValueError:
            try:
                wait = parsedate_to_datetime(value).timestamp() - now
            except (TypeError, ValueError, IndexError):
                wait = None
    if wait is None:
        reset = headers.get("X-RateLimit-Reset", "").strip()
        try:
            wait = float(reset) - now if reset else None
        except ValueError:
            wait = None
    if wait is None or wait != wait:  # NaN
        return 60.0
    return min(max(wait, 1.0), MAX_WAIT)


def read_user(payload: Any) -> Found | Unusable:
    """What a users answer gives us, judged (it is untrusted)."""
    if not isinstance(payload, dict):
        return Unusable("Auth0 answered something that is not a user")
    email = payload.get("email")
    if not isinstance(email, str) or not email:
        return Unusable("the user has no email address")
    if not _EMAIL.match(email) or len(email) > 254:
        return Unusable("the user's email address is malformed")
    if payload.get("email_verified") is not True:
        return Unusable("the user's email address is not verified")
    name = payload.get("name")
    clean = _CONTROL.sub("", name).strip()[:100] if isinstance(name, str) else ""
    return Found(email, clean or None)


class Auth0Users:
    def __init__(self, http: aiohttp.ClientSession, base_url: str, client_id: str,
                 client_secret: str, policy: UrlPolicy, *, timeout: float = 10.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.http = http
        self.base = base_url.rstrip("/")
        self.audience = f"{self.base}/api/v2/"
        self._client_id = client_id
        self._client_secret = client_secret
        secrets.add(client_secret)
        self.policy = policy
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.monotonic = monotonic
        self._token: tuple[str, float] | None = None  # (token, monotonic expiry)
        self._fetching: asyncio.Lock = asyncio.Lock()
        self.last_error: str | None = None
        self.token_fetches = 0

    def refusal(self) -> str | None:
        """Why the policy forbids sending the client secret to this Auth0 URL, or None."""
        return self.policy.refusal(f"{self.base}/oauth/token", "auth0")

    async def user(self, sub: str) -> Lookup:
        refused = self.refusal()
        if refused is not None:
            return Unavailable(f"the Auth0 URL is refused by the outbound policy: {refused}")
        for fresh in (False, True):
            token = await self._access_token(fresh)
            if not isinstance(token, str):
                return self._note(token)
            outcome = await self._get_user(sub, token)
            if not isinstance(outcome, str):
                return self._note(outcome)
            self._token = None  # refused before its time (rotated, revoked): get another
        return self._note(Unavailable("Auth0 refused a fresh Management API token"))

    def _note(self, outcome: Lookup) -> Lookup:
        self.last_error = outcome.reason if isinstance(outcome, Unavailable) else None
        return outcome

    async def _access_token(self, fresh: bool) -> str | RateLimited | Unavailable:
        async with self._fetching:
            cached = self._token
            if cached is not None and not fresh and self.monotonic() < cached[1]:
                return cached[0]
            body = {"grant_type": "client_credentials", "client_id": self._client_id,
                    "client_secret": self._client_secret, "audience": self.audience}
            self.token_fetches += 1
            try:
                async with self.http.post(f"{self.base}/oauth/token", json=body,
                                          timeout=self.timeout, allow_redirects=False) as r:
                    if r.status == 429:
                        return RateLimited(retry_after(r.headers))
                    payload = await r.json(content_type=None) if r.status == 200 else None
                    status = r.status
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                return Unavailable(_describe("token request failed", exc))
            if status != 200:
                return Unavailable(f"Auth0 refused the client credentials (HTTP {status})")
            token = payload.get("access_token") if isinstance(payload, dict) else None
            expires = payload.get("expires_in") if isinstance(payload, dict) else None
            if not isinstance(token, str) or not token:
                return Unavailable("Auth0's token answer has no access_token")
            secrets.add(token)
            lifetime = float(expires) if isinstance(expires, int | float) and expires > 0 \
                else 3600.0
            self._token = (token, self.monotonic() + max(0.0, lifetime - TOKEN_MARGIN))
            return token

    async def _get_user(self, sub: str, token: str) -> Lookup | str:
        url = (f"{self.base}/api/v2/users/{quote(sub, safe='')}"
               "?fields=email,email_verified,name&include_fields=true")
        try:
            async with self.http.get(url, headers={"Authorization": f"Bearer {token}"},
                                     timeout=self.timeout, allow_redirects=False) as r:
                status = r.status
                if status == 429:
                    return RateLimited(retry_after(r.headers))
                if status == 401:
                    return "stale-token"
                if status == 404:
                    return NotFound()
                if status != 200:
                    return Unavailable(f"Auth0 users endpoint answered HTTP {status}")
                payload = await r.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return Unavailable(_describe("users request failed", exc))
        return read_user(payload)


def _describe(what: str, exc: BaseException) -> str:
    return secrets.scrub(f"{what}: {type(exc).__name__}: {exc}")[:300]
