"""One request to a provider's file API, with everything a request needs around it:

- the URL is checked by the outbound policy first (`ctx.policy`): the access token is
  never sent where it refuses, and a link the provider handed back (a Graph
  `@odata.nextLink`) is checked like any other URL;
- it holds a slot of the provider's limiter, which sits within the limiter every job
  shares (`ctx.limiter`), for the time of the request only (never while waiting for a
  retry or a token refresh);
- the answer is read up to `MAX_ANSWER` bytes and parsed off the event loop when it is
  large; what it means is `decide.read_answer`'s;
- a 401 goes through the one "refresh now and wait" path (`refresh` hook, which uses
  `jobs/refresh/now.py`), then the request is sent once more with the new token; a
  second 401 is the project's problem (`ProjectProblem`);
- a rate limit (429, 503 with `Retry-After`, Drive's 403 `rateLimitExceeded`) is
  honoured: nothing more is sent to that provider by this job until `Retry-After` has
  passed, and the request is retried; a wait longer than `files.max_retry_wait`, or
  retries used up, raises `TransientError(retry_after)`: the engine retries the run
  later, and it resumes from its saved cursor;
- redirects are never followed (the request carries a bearer token).
Messages never carry the token: it is cut out of anything a provider echoes.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from ...config import FileIndexSettings
from ...logs import secrets
from ...outbound import UrlPolicy
from ...queues import TransientError
from ...ratelimit import KeyedLimiter
from ..providers import Kind
from .decide import Outcome, Verdict, read_answer, retry_wait
from .model import CursorExpired, ProjectProblem

MAX_ANSWER = 8 * 2 ** 20  # bytes of one answer; a page of 1,000 items is about 1 MB
PARSE_IN_THREAD = 256 * 1024  # larger answers are parsed on a worker thread
TRIES = 4  # sends of one request before the run gives up for now


class Missing(Exception):
    """The provider says 404 (or Dropbox `path/not_found`): the lister decides what
    that means (a missing folder, or a page token that is no longer known)."""


@dataclass
class Connection:
    """One project's access to its provider during one pass."""

    integration: dict[str, Any]  # with its encrypted tokens, as read
    provider: dict[str, Any]
    kind: Kind
    key: str  # the provider's id: the limiter's key
    token: str  # the decrypted access token
    base: str  # the file API's base URL
    refreshed: bool = False
    requests: int = 0


RefreshHook = Callable[[Connection], Awaitable[None]]
CallHook = Callable[[str, Outcome], None]


class ProviderClient:
    def __init__(self, http: aiohttp.ClientSession, policy: UrlPolicy, limiter: KeyedLimiter,
                 settings: FileIndexSettings, *, refresh: RefreshHook, on_call: CallHook,
                 user_agent: str, clock: Callable[[], datetime]) -> None:
        self.http = http
        self.policy = policy
        self.limiter = limiter
        self.settings = settings
        self.refresh = refresh
        self.on_call = on_call
        self.user_agent = user_agent
        self.clock = clock
        self._not_before: dict[str, float] = {}  # provider id -> monotonic time

    async def call(self, conn: Connection, method: str, url: str,
                   body: dict[str, Any] | None = None) -> dict[str, Any]:
        """The answer's JSON object; raises `Missing`, `CursorExpired`, `ProjectProblem`
        or `TransientError` (see the module's docstring)."""
        attempt = 0
        while True:
            attempt += 1
            refusal = self.policy.refusal(url, conn.kind)
            if refusal is not None:
                raise ProjectProblem("provider/url-refused",
                                     f"the outbound policy refuses {_host(url)}: {refusal}")
            await self._wait_turn(conn.key)
            verdict, payload = await self._send(conn, method, url, body)
            self.on_call(conn.kind, verdict.outcome)
            if verdict.outcome == "ok":
                assert isinstance(payload, dict)
                return payload
            message = self._clean(verdict.message, conn)
            if verdict.outcome == "unauthorized":
                if conn.refreshed:
                    raise ProjectProblem("auth/refused",
                                         f"{message}, even with a freshly refreshed token")
                await self.refresh(conn)  # raises when it cannot help
                conn.refreshed = True
                attempt -= 1  # the refresh was the answer to this one, not a retry
                continue
            if verdict.outcome == "cursor_expired":
                raise CursorExpired(message)
            if verdict.outcome == "not_found":
                raise Missing(message)
            wait = retry_wait(verdict.outcome, verdict.retry_after, attempt, tries=TRIES,
                              max_wait=self.settings.max_retry_wait)
            if wait is None:
                if verdict.outcome in ("rate_limited", "server_error", "network"):
                    raise TransientError(f"{conn.kind} API: {message}",
                                         retry_after=verdict.retry_after)
                raise ProjectProblem(f"provider/{verdict.outcome.replace('_', '-')}",
                                     f"{conn.kind} API: {message}")
            if verdict.outcome == "rate_limited":  # the whole provider waits, not one run
                until = time.monotonic() + wait
                self._not_before[conn.key] = max(self._not_before.get(conn.key, 0.0), until)
            else:
                await asyncio.sleep(wait)

    async def _wait_turn(self, key: str) -> None:
        delay = self._not_before.get(key, 0.0) - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    async def _send(self, conn: Connection, method: str, url: str,
                    body: dict[str, Any] | None) -> tuple[Verdict, Any]:
        headers = {"Authorization": f"Bearer {conn.token}", "Accept": "application/json",
                   "User-Agent": self.user_agent}
        data: bytes | None = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(body).encode()
        timeout = self.settings.request_timeout
        async with self.limiter.slot(conn.key):
            conn.requests += 1
            try:
                async with self.http.request(
                        method, url, data=data, headers=headers, allow_redirects=False,
                        timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                    raw = await _read(resp)
                    status, resp_headers = resp.status, resp.headers
            except TimeoutError:
                return Verdict("network", f"no answer within {timeout:g}s"), None
            except (aiohttp.ClientError, OSError, ValueError) as exc:
                return Verdict("network", f"network error: {type(exc).__name__}"), None
        if raw is None:
            return Verdict("bad_answer", f"HTTP {status}: the answer is larger than "
                                         f"{MAX_ANSWER // 2 ** 20} MiB"), None
        payload = await _json(raw)
        return read_answer(status, resp_headers, payload, now=self.clock()), payload

    @staticmethod
    def _clean(message: str, conn: Connection) -> str:
        if len(conn.token) >= 6:
            message = message.replace(conn.token, "[redacted]")
        return secrets.scrub(message)[:300]


async def _read(resp: aiohttp.ClientResponse) -> bytes | None:
    """The body, or None when it is larger than MAX_ANSWER (the rest is not read)."""
    body = bytearray()
    async for chunk in resp.content.iter_chunked(65536):
        body += chunk
        if len(body) > MAX_ANSWER:
            return None
    return bytes(body)


def _parse(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


async def _json(raw: bytes) -> Any:
    if len(raw) > PARSE_IN_THREAD:
        return await asyncio.to_thread(_parse, raw)
    return _parse(raw)


def _host(url: str) -> str:
    try:
        return urlsplit(url).netloc[:100] or "?"
    except ValueError:
        return "?"
