"""Storage quota of one connected integration, from its provider's API.

- Dropbox: `POST {metadata.apiBaseUrl or https://api.dropboxapi.com/2}/users/
  get_space_usage`, body `null`: `used`, `allocation.allocated`;
- Google: `GET https://www.googleapis.com/drive/v3/about?fields=storageQuota`:
  `storageQuota.usage`, `.limit` (digit strings; no limit means unlimited);
- Microsoft: `GET https://graph.microsoft.com/v1.0/me/drive`: `quota.used`, `quota.total`.

`metadata.quotaUrl` replaces the URL for any kind; other kinds have no quota request.
The request goes where the outbound policy allows the access token to go, at most
`analytics.quota_provider_concurrency` at once and `quota_provider_rate` per second per
provider, inside the limiter every job shares (`JobContext.limiter`); redirects are
not followed. A 401 goes through the one "refresh now and wait" path
(jobs/refresh/now.py), then the request is sent once more with the new token.

Answers are untrusted: numbers must be non-negative integers (Google sends digit
strings), else the reading is `bad-answer`. `read_quota` is pure (a table in the tests).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp

from ...logs import secrets
from ..providers import Kind

DROPBOX_API = "https://api.dropboxapi.com/2"
GOOGLE_QUOTA_URL = "https://www.googleapis.com/drive/v3/about?fields=storageQuota"
MICROSOFT_QUOTA_URL = "https://graph.microsoft.com/v1.0/me/drive"
MAX_BODY = 64 * 1024
MAX_BYTES = 2 ** 62  # anything above is no byte count

State = Literal["ok", "unauthorized", "failed", "bad-answer", "unsupported", "refused"]


@dataclass(frozen=True)
class QuotaSpec:
    kind: Kind
    method: Literal["GET", "POST"]
    url: str | None
    json_null_body: bool = False


@dataclass(frozen=True)
class Reading:
    state: State
    used: int | None = None
    allocated: int | None = None  # None: unlimited, or not said
    message: str = ""
    http_status: int | None = None


def quota_spec(kind: Kind, metadata: Mapping[str, Any]) -> QuotaSpec:
    override = _url(metadata.get("quotaUrl"))
    if kind == "dropbox":
        base = _url(metadata.get("apiBaseUrl")) or DROPBOX_API
        return QuotaSpec(kind, "POST", override or f"{base.rstrip('/')}/users/get_space_usage",
                         json_null_body=True)
    if kind == "google":
        return QuotaSpec(kind, "GET", override or GOOGLE_QUOTA_URL)
    if kind == "microsoft":
        return QuotaSpec(kind, "GET", override or MICROSOFT_QUOTA_URL)
    return QuotaSpec(kind, "GET", override)


def _url(value: Any) -> str | None:
    if isinstance(value, str) and value.startswith(("https://", "http://")):
        return value.strip()
    return None


def _count(value: Any) -> int | None:
    """A byte count from an untrusted answer: an int, or a string of digits (Google)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.isdigit() and len(value) <= 20:
        value = int(value)
    if isinstance(value, int) and 0 <= value <= MAX_BYTES:
        return value
    return None


def read_quota(kind: Kind, status: int, payload: Any) -> Reading:
    """What an answer says (never raises)."""
    if status == 401:
        return Reading("unauthorized", message="HTTP 401", http_status=status)
    if not 200 <= status < 300:
        return Reading("failed", message=f"HTTP {status}", http_status=status)
    if not isinstance(payload, dict):
        return Reading("bad-answer", message="the answer is not a JSON object",
                       http_status=status)
    used: int | None
    allocated: int | None
    if kind == "dropbox":
        allocation = payload.get("allocation")
        used = _count(payload.get("used"))
        allocated = _count(allocation.get("allocated")) if isinstance(allocation, dict) else None
        ok = used is not None and allocated is not None
    elif kind == "google":
        quota = payload.get("storageQuota")
        if not isinstance(quota, dict):
            return Reading("bad-answer", message="no storageQuota", http_status=status)
        used = _count(quota.get("usage"))
        allocated = _count(quota.get("limit")) if "limit" in quota else None
        ok = used is not None and ("limit" not in quota or allocated is not None)
    elif kind == "microsoft":
        quota = payload.get("quota")
        if not isinstance(quota, dict):
            return Reading("bad-answer", message="no quota", http_status=status)
        used = _count(quota.get("used"))
        allocated = _count(quota.get("total"))
        ok = used is not None and allocated is not None
    else:
        return Reading("unsupported", http_status=status)
    if not ok:
        return Reading("bad-answer", message="the byte counts are missing or not numbers",
                       http_status=status)
    return Reading("ok", used, allocated, http_status=status)


async def fetch(http: aiohttp.ClientSession, spec: QuotaSpec, token: str, *, timeout: float,
                user_agent: str) -> Reading:
    """Send the quota request with `token`; never raises for what the network does."""
    if spec.url is None:
        return Reading("unsupported", message="no quota request for this kind of provider")
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json",
               "User-Agent": user_agent}
    data = None
    if spec.json_null_body:
        headers["Content-Type"] = "application/json"
        data = b"null"
    try:
        async with http.request(spec.method, spec.url, data=data, headers=headers,
                                allow_redirects=False,
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            body = await resp.content.read(MAX_BODY)
            status = resp.status
    except TimeoutError:
        return Reading("failed", message=f"no answer within {timeout:g}s")
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        return Reading("failed", message=secrets.scrub(f"network error: {type(exc).__name__}")
                       [:200])
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    return read_quota(spec.kind, status, payload)
