"""Provider probes: one authenticated request that says whether an access token still works.

What is asked of each kind of provider (the kind comes from the provider's
`metadata.providerType`, else its `slug`, else its `name`):

- dropbox: `POST {metadata.apiBaseUrl or https://api.dropboxapi.com/2}/users/get_current_account`
  with the body `null` (`Content-Type: application/json`), as the MWAP backend does;
- google: `GET https://www.googleapis.com/drive/v3/about?fields=user`;
- microsoft: `GET https://graph.microsoft.com/v1.0/me/drive`;
- anything else: a Bearer `GET metadata.apiBaseUrl`, as the MWAP backend does.

`metadata.healthCheckUrl` replaces the whole URL for any kind (a proxy, a
regional endpoint, a test server). A provider of unknown kind with neither
URL cannot be probed, and its integrations are reported as `skipped`.

Redirects are never followed: the request carries a bearer token, and a
redirect (to another host above all) must not receive it. A 3xx answer is a
failure that names where it pointed.

How an answer is read (`classify`), from the most to the least specific:
- 2xx with the body the kind promises (Dropbox `account_id`, Google `user`,
  Microsoft `id`; anything for other kinds) → `ok`; a 2xx with another body
  (an HTML login page, a proxy's answer) → `failure`;
- an explicit revocation code in the error body on a 400/401/403
  (`REVOKED_ERRORS`, plus the provider's `metadata.healthRevokedErrors`) → `revoked`;
- 401 → `unauthorized` (usually a stale token: the caller refreshes and probes again);
- 403 → `forbidden` (the backend's `expired`), unless the error is a rate or
  quota limit (`TRANSIENT_403_ERRORS`) or carries `Retry-After` → `failure`;
- 3xx, 429, 5xx, any other 4xx, timeouts and network errors → `failure`
  (counted; the caller decides when failures become `error`).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp

from ...logs import secrets
from ..providers import Kind, provider_kind

Verdict = Literal["ok", "unauthorized", "revoked", "forbidden", "failure", "skipped"]

DROPBOX_API = "https://api.dropboxapi.com/2"
GOOGLE_PROBE_URL = "https://www.googleapis.com/drive/v3/about?fields=user"
MICROSOFT_PROBE_URL = "https://graph.microsoft.com/v1.0/me/drive"
MAX_BODY = 64 * 1024  # what we read of an answer; probes answer with a few hundred bytes

# Error codes by which a provider says, in so many words, that access is withdrawn and a
# token refresh cannot bring it back. Compared case-insensitively with the codes found in
# the error body (`error_codes`). Kept deliberately short: `revoked` is never undone
# automatically, so a code that can also mean "stale token" does not belong here
# (Dropbox `invalid_access_token` and `expired_access_token`, Graph
# `InvalidAuthenticationToken` and Google's 401 all go through a refresh first).
REVOKED_ERRORS: dict[Kind, frozenset[str]] = {
    "dropbox": frozenset({"user_suspended"}),
    "google": frozenset(),
    "microsoft": frozenset(),
    "generic": frozenset(),
}
# A 403 with one of these codes is a rate or quota limit, not a lost permission.
TRANSIENT_403_ERRORS = frozenset({
    "ratelimitexceeded", "userratelimitexceeded", "dailylimitexceeded", "quotaexceeded",
    "resource_exhausted", "toomanyrequests", "too_many_requests", "activitylimitreached",
    "too_many_write_operations",
})


@dataclass(frozen=True)
class ProbeSpec:
    """What to send: `url` is None when the provider gives us nothing to probe."""

    kind: Kind
    method: Literal["GET", "POST"]
    url: str | None
    json_null_body: bool = False


@dataclass(frozen=True)
class ProbeResult:
    verdict: Verdict
    message: str
    http_status: int | None = None
    latency_ms: float | None = None




def probe_spec(provider: Mapping[str, Any]) -> ProbeSpec:
    metadata = provider.get("metadata") or {}
    kind = provider_kind(provider)
    override = _url(metadata.get("healthCheckUrl"))
    if kind == "dropbox":
        base = _url(metadata.get("apiBaseUrl")) or DROPBOX_API
        url = override or f"{base.rstrip('/')}/users/get_current_account"
        return ProbeSpec(kind, "POST", url, json_null_body=True)
    if kind == "google":
        return ProbeSpec(kind, "GET", override or GOOGLE_PROBE_URL)
    if kind == "microsoft":
        return ProbeSpec(kind, "GET", override or MICROSOFT_PROBE_URL)
    return ProbeSpec(kind, "GET", override or _url(metadata.get("apiBaseUrl")))


def revoked_errors(provider: Mapping[str, Any], kind: Kind) -> frozenset[str]:
    """The built-in revocation codes of `kind` plus `metadata.healthRevokedErrors`."""
    extra = (provider.get("metadata") or {}).get("healthRevokedErrors")
    codes = {c.lower() for c in extra if isinstance(c, str)} if isinstance(extra, list) else set()
    return REVOKED_ERRORS[kind] | codes


def _url(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return None
    value = value.strip()
    parts = urlsplit(value)
    return value if parts.scheme in ("http", "https") and parts.netloc else None


async def probe(http: aiohttp.ClientSession, spec: ProbeSpec, access_token: str, *,
                timeout: float, user_agent: str,
                revoked: Iterable[str] = ()) -> ProbeResult:
    """Send the probe and classify the answer. Never raises for anything the network does."""
    if spec.url is None:
        return ProbeResult("skipped", "no probe URL for this provider (set metadata.apiBaseUrl "
                                      "or metadata.healthCheckUrl)")
    headers = {"Authorization": f"Bearer {access_token}", "Accept": "application/json",
               "User-Agent": user_agent}
    data: bytes | None = None
    if spec.json_null_body:
        headers["Content-Type"] = "application/json"
        data = b"null"
    started = time.monotonic()
    try:
        async with http.request(spec.method, spec.url, data=data, headers=headers,
                                allow_redirects=False,
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            body = bytearray()
            async for chunk in resp.content.iter_chunked(16384):
                body += chunk
                if len(body) >= MAX_BODY:
                    break
            status, resp_headers = resp.status, resp.headers
    except TimeoutError:
        return ProbeResult("failure", f"no answer within {timeout:g}s",
                           latency_ms=_ms(started))
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        return ProbeResult("failure", f"network error: {type(exc).__name__}"
                                      f"{': ' + _short(str(exc)) if str(exc) else ''}",
                           latency_ms=_ms(started))
    latency = _ms(started)
    verdict, message = classify(spec, status, resp_headers, bytes(body), frozenset(revoked))
    if len(access_token) >= 6:  # a provider (or proxy) that echoes the token keeps it
        message = message.replace(access_token, "[redacted]")
    return ProbeResult(verdict, message, status, latency)


def classify(spec: ProbeSpec, status: int, headers: Mapping[str, str], body: bytes,
             revoked: frozenset[str] = frozenset()) -> tuple[Verdict, str]:
    """The verdict on one answer and a short message for operators (no token, ever)."""
    payload = _json(body)
    if 200 <= status < 300:
        problem = _unexpected_body(spec.kind, payload, body)
        if problem:
            return "failure", f"HTTP {status} but {problem}"
        return "ok", f"HTTP {status}"
    if 300 <= status < 400:
        location = headers.get("Location", "")
        where = urlsplit(location).netloc if location else ""
        own = urlsplit(spec.url or "").netloc
        target = "another host " + where if where and where != own else (location or "nowhere")
        return "failure", (f"HTTP {status} redirect to {_short(target, 120)}; redirects are "
                           "not followed with the bearer token (check the probe URL)")
    codes = error_codes(payload, headers)
    detail = error_text(payload) or ", ".join(sorted(codes))
    described = f"HTTP {status}{': ' + detail if detail else ''}"
    if status in (400, 401, 403) and revoked & {c.lower() for c in codes}:
        return "revoked", f"{described} (the provider says access was revoked)"
    if status == 401:
        return "unauthorized", f"{described} (access token refused)"
    if status == 403:
        lowered = {c.lower() for c in codes}
        if lowered & TRANSIENT_403_ERRORS or "Retry-After" in headers:
            return "failure", f"{described} (rate or quota limit)"
        return "forbidden", f"{described} (access denied)"
    if status == 429:
        return "failure", f"{described} (rate limited)"
    return "failure", described


def error_codes(payload: Any, headers: Mapping[str, str] | None = None) -> set[str]:
    """Machine-readable error codes in the shapes Dropbox, Google, Graph and OAuth use."""
    codes: set[str] = set()
    if isinstance(payload, dict):
        summary = payload.get("error_summary")
        if isinstance(summary, str) and summary:
            codes.add(summary.split("/", 1)[0].strip())
        error = payload.get("error")
        if isinstance(error, str):
            codes.add(error)
        elif isinstance(error, dict):
            for key in (".tag", "code", "status"):
                value = error.get(key)
                if isinstance(value, str) and value:
                    codes.add(value)
            for item in error.get("errors") or []:
                if isinstance(item, dict) and isinstance(item.get("reason"), str):
                    codes.add(item["reason"])
    challenge = (headers or {}).get("WWW-Authenticate", "")
    match = re.search(r'error="([^"]+)"', challenge)
    if match:
        codes.add(match.group(1))
    return {c for c in codes if c}


def error_text(payload: Any) -> str:
    """A short human description of an error body, or ''."""
    if not isinstance(payload, dict):
        return ""
    parts: list[str] = []
    if isinstance(payload.get("error_summary"), str):
        parts.append(payload["error_summary"])
    error = payload.get("error")
    if isinstance(error, str):
        parts.append(error)
        if isinstance(payload.get("error_description"), str):
            parts.append(payload["error_description"])
    elif isinstance(error, dict) and not parts:
        for key in ("code", "status", "message"):
            value = error.get(key)
            if isinstance(value, str | int) and str(value) not in parts:
                parts.append(str(value))
    return _short(" ".join(parts))


def _unexpected_body(kind: Kind, payload: Any, body: bytes) -> str | None:
    expected = {"dropbox": "account_id", "google": "user", "microsoft": "id"}.get(kind)
    if expected is None:
        return None
    if payload is None:
        return "the body is not JSON" if body.strip() else "the body is empty"
    if not isinstance(payload, dict) or expected not in payload:
        return f"the JSON has no {expected!r} (not the {kind} API?)"
    return None


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _short(text: str, limit: int = 200) -> str:
    text = secrets.scrub(" ".join(text.split()))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)
