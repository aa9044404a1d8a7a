"""The file index's decisions, pure (no I/O; tables in tests/test_files_decide.py):

- `read_answer`: what one provider answer means (`Verdict`);
- `retry_wait`: whether, and after how long, to send a request again;
- `ineligible`: why a project is not indexed (None when it is);
- `plan`: which pass a run makes (resume one, full, incremental);
- `differs`: whether a stored document must be rewritten;
- `folder_path`, `join`: the display paths the index stores.

| answer                                                  | verdict           |
|---------------------------------------------------------|-------------------|
| 2xx with a JSON object                                  | `ok`              |
| 2xx with anything else                                  | `bad_answer`      |
| 401                                                     | `unauthorized` (refresh, retry once) |
| 429; 503 with `Retry-After`; a 403 rate or quota limit   | `rate_limited`    |
| (Drive `rateLimitExceeded`, `userRateLimitExceeded`, ...) |                   |
| 409 `reset` (Dropbox), 410 (Graph `resyncRequired`)     | `cursor_expired` (a full pass) |
| 404; 409 `path/not_found` (Dropbox)                     | `not_found`       |
| 403 otherwise                                           | `forbidden`       |
| 5xx, other 409                                          | `server_error`    |
| other 4xx, 3xx (redirects are never followed)           | `refused`         |
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any, Literal

from ..health.probes import TRANSIENT_403_ERRORS, error_codes, error_text

Outcome = Literal["ok", "unauthorized", "rate_limited", "cursor_expired", "not_found",
                  "forbidden", "server_error", "refused", "bad_answer", "network"]
OUTCOMES: tuple[Outcome, ...] = ("ok", "unauthorized", "rate_limited", "cursor_expired",
                                 "not_found", "forbidden", "server_error", "refused",
                                 "bad_answer", "network")
MAX_PATH = 4096
MAX_RETRY_AFTER = 86400.0


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    message: str
    retry_after: float | None = None


def retry_after(headers: Any, payload: Any, now: datetime | None = None) -> float | None:
    """Seconds the provider asks us to wait: `Retry-After` (seconds or an HTTP date), or
    Dropbox's `error.retry_after`; None when it says nothing usable."""
    raw = headers.get("Retry-After") if headers is not None else None
    value: float | None = None
    if isinstance(raw, str) and raw.strip():
        text = raw.strip()
        try:
            value = float(text)
        except ValueError:
            try:
                when = parsedate_to_datetime(text)
            except (TypeError, ValueError):
                when = None
            if when is not None and now is not None and when.tzinfo is not None:
                value = (when - now).total_seconds()
    if value is None and isinstance(payload, dict):
        error = payload.get("error")
        inner = error.get("retry_after") if isinstance(error, dict) else None
        if isinstance(inner, int | float) and not isinstance(inner, bool):
            value = float(inner)
    if value is None or not math.isfinite(value):
        return None
    return min(max(0.0, value), MAX_RETRY_AFTER)


def read_answer(status: int, headers: Any, payload: Any, *,
                now: datetime | None = None) -> Verdict:
    """What one answer means (see the table above)."""
    if 200 <= status < 300:
        if isinstance(payload, dict):
            return Verdict("ok", f"HTTP {status}")
        return Verdict("bad_answer", f"HTTP {status} but the body is not a JSON object")
    codes = {c.lower() for c in error_codes(payload, headers)}
    detail = error_text(payload) or ", ".join(sorted(codes))
    described = f"HTTP {status}{': ' + detail if detail else ''}"
    wait = retry_after(headers, payload, now)
    summary = payload.get("error_summary") if isinstance(payload, dict) else None
    tag = summary.split("/", 1)[0] if isinstance(summary, str) else ""
    if status == 401:
        return Verdict("unauthorized", f"{described} (access token refused)")
    if status == 429 or (status == 503 and wait is not None) or (
            status == 403 and (codes & TRANSIENT_403_ERRORS or wait is not None)):
        return Verdict("rate_limited", f"{described} (rate limited)", wait)
    if (status == 409 and (tag == "reset" or "reset" in codes)) or status == 410:
        return Verdict("cursor_expired", f"{described} (the stored cursor expired)")
    if status == 404 or (status == 409 and isinstance(summary, str)
                         and summary.startswith("path/not_found")):
        return Verdict("not_found", f"{described} (not found)")
    if status == 403:
        return Verdict("forbidden", f"{described} (access denied)")
    if status >= 500 or status == 409:
        return Verdict("server_error", described, wait)
    return Verdict("refused", described)


def retry_wait(outcome: Outcome, wait: float | None, attempt: int, *, tries: int,
               max_wait: float) -> float | None:
    """Seconds to wait before sending request `attempt + 1` after attempt `attempt`
    (1-based) ended with `outcome`, or None to stop retrying here (a rate limit asking
    for longer than `max_wait` is the run's to retry, later, from its saved cursor)."""
    if attempt >= tries or outcome not in ("rate_limited", "server_error", "network"):
        return None
    backoff = min(30.0, 0.5 * 2 ** (attempt - 1))
    delay = wait if wait is not None else backoff
    return delay if delay <= max_wait else None


def ineligible(project: dict[str, Any], integration: dict[str, Any] | None) -> str | None:
    """Why this project is not indexed now, or None. Ids are compared as strings (the
    backend stores them as hex strings, older documents as ObjectIds)."""
    if project.get("archived") is True:
        return "the project is archived"
    if not project.get("cloudIntegrationId"):
        return "the project names no cloud integration"
    if folder_path(project.get("folderpath")) is None:
        return "the project's folderpath is not an absolute path"
    if integration is None:
        return "the project's integration does not exist"
    if str(integration.get("tenantId")) != str(project.get("tenantId")):
        return "the project's integration belongs to another tenant"
    if integration.get("status") == "revoked":
        return "the integration is revoked"
    if not integration.get("accessToken") and not integration.get("connected"):
        return "the integration is not connected"
    return None


@dataclass(frozen=True)
class Plan:
    mode: Literal["full", "incremental"]
    resume: bool  # continue the pass in progress
    why: str


def plan(requested: str, in_progress: dict[str, Any] | None, cursor: dict[str, Any] | None,
         config: dict[str, Any], last_full: datetime | None, now: datetime,
         full_interval: float) -> Plan:
    """Which pass to make. A pass in progress for the same configuration is resumed
    (unless a full pass is asked and it is incremental); a full pass is made when there
    is no cursor for this configuration (first pass, another folder or integration), when
    asked, or when the last one is `full_interval` seconds old; else an incremental one."""
    same = _same(in_progress, config)
    if in_progress is not None and same and not (
            requested == "full" and in_progress.get("mode") != "full"):
        if in_progress.get("mode") == "full":
            return Plan("full", True, "resuming the full pass in progress")
        return Plan("incremental", True, "resuming the incremental pass in progress")
    if cursor is None or not _same(cursor, config) or cursor.get("value") is None:
        return Plan("full", False, "no cursor for this folder yet")
    if requested == "full":
        return Plan("full", False, "a full pass was asked for")
    if last_full is None or now - last_full >= timedelta(seconds=full_interval):
        return Plan("full", False, "the last full pass is older than files.full_interval")
    return Plan("incremental", False, "changes since the stored cursor")


def _same(doc: dict[str, Any] | None, config: dict[str, Any]) -> bool:
    return doc is not None and all(doc.get(k) == v for k, v in config.items())


def differs(stored: dict[str, Any], fields: dict[str, Any]) -> bool:
    """Whether what the provider says now differs from the stored document."""
    return any(stored.get(name) != value for name, value in fields.items())


def folder_path(value: Any) -> str | None:
    """A project's `folderpath` as the index stores paths: `/A/B` (`/` for the root),
    or None when it is not an absolute path (empty segments are dropped; `.`, `..` and
    control characters are refused, not interpreted)."""
    if not isinstance(value, str) or not value.startswith("/") or len(value) > MAX_PATH:
        return None
    parts = [p for p in value.split("/") if p]
    if any(p in (".", "..") or any(ord(c) < 32 for c in p) for p in parts):
        return None
    return "/" + "/".join(parts)


def join(parent: str, name: str) -> str:
    return f"{parent.rstrip('/')}/{name}"


def segments(path: str) -> list[str]:
    return [p for p in path.split("/") if p]
