"""Analytics over HTTP:

- `GET /api/v1/analytics?from=YYYY-MM-DD&to=YYYY-MM-DD&tenantId=ID`: the daily
  snapshots from `from` to `to` (default: the last 30 days; at most
  `analytics.max_days`). Without `tenantId`, the platform's totals (an admin token or a
  superadmin); with it, that tenant's (its owner too; anyone else 403). Days without a
  snapshot are absent, not zero.
- `POST /api/v1/analytics/run?day=YYYY-MM-DD` (admin, audited): a run now, for `day`
  (default today), replacing that day's snapshots.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from aiohttp import web

from ...api.envelope import ApiError, ok
from ...api.keys import AUTH, ENGINE
from ...api.openapi import operation
from ...config import AnalyticsSettings
from ...logs import audit
from ...storage.analytics import AnalyticsStore
from .daily import JOB_ID, QUEUE, Analytics, day_of

PATH = "/api/v1/analytics"
RUN_PATH = "/api/v1/analytics/run"
DAY = {"type": "string", "format": "date"}
OPENAPI = {
    PATH: {"get": operation(
        "Daily snapshots: the platform's (admin) or one tenant's (also its owner)",
        params=[{"name": "from", "in": "query", "schema": DAY},
                {"name": "to", "in": "query", "schema": DAY},
                {"name": "tenantId", "in": "query",
                 "schema": {"type": "string", "pattern": "^[0-9a-fA-F]{24}$"}}],
        errors=("503",))},
    RUN_PATH: {"post": operation(
        "Write the day's snapshots now", ok_status="202",
        params=[{"name": "day", "in": "query", "schema": DAY}], errors=("503",))},
}
_HEX24 = re.compile(r"^[0-9a-fA-F]{24}$")
_DATE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
DEFAULT_DAYS = 30


@dataclass(frozen=True)
class AnalyticsApi:
    analytics: Analytics | None
    store: AnalyticsStore
    settings: AnalyticsSettings
    clock: Callable[[], datetime]


ANALYTICS_API: web.AppKey[AnalyticsApi] = web.AppKey("analytics_api")


def _day(request: web.Request, name: str, default: date) -> date:
    """A YYYY-MM-DD query parameter. Only that form: `date.fromisoformat` also takes
    `20261201` and week dates (`2026-W49-2`), which no caller means."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        if not _DATE.fullmatch(raw):
            raise ValueError
        return date.fromisoformat(raw)
    except ValueError:
        raise ApiError(400, "validation/invalid-parameter",
                       f"{name} must be a date as YYYY-MM-DD") from None


def _days_before(last: date, days: int) -> date:
    """`days` before `last`, or the first day there is (a `to` in year 1: no 500)."""
    try:
        return last - timedelta(days=days)
    except OverflowError:
        return date.min


def view(doc: dict[str, Any]) -> dict[str, Any]:
    """A snapshot as the API shows it (fields named one by one: no raw document)."""
    keys = ("day", "tenantId", "scope", "computedAt", "tenants", "projects", "members",
            "integrations", "refresh", "health", "files", "quota")
    return {k: doc.get(k) for k in keys if k in doc}


async def snapshots(request: web.Request) -> web.Response:
    api = request.app[ANALYTICS_API]
    tenant_id = request.query.get("tenantId")
    if tenant_id is not None and not _HEX24.fullmatch(tenant_id):
        raise ApiError(400, "validation/invalid-id", "tenantId must be a 24-hex id")
    auth = request.app[AUTH]  # who asks first: a stranger learns nothing from a 400
    if tenant_id is None:
        await auth.require_admin(request)
    else:
        await auth.require_tenant_access(request, tenant_id)
    today = date.fromisoformat(day_of(api.clock(), api.settings.timezone))
    last = _day(request, "to", today)
    first = _day(request, "from", _days_before(last, DEFAULT_DAYS - 1))
    if first > last:
        raise ApiError(400, "validation/invalid-parameter", "from must not be after to")
    if (last - first).days + 1 > api.settings.max_days:
        raise ApiError(400, "validation/invalid-parameter",
                       f"at most {api.settings.max_days} days at a time")
    docs = await api.store.snapshots(tenant_id, first.isoformat(), last.isoformat())
    return ok({"from": first.isoformat(), "to": last.isoformat(), "tenantId": tenant_id,
               "scope": "tenant" if tenant_id else "platform",
               "enabled": api.analytics is not None, "days": [view(d) for d in docs]})


async def run_now(request: web.Request) -> web.Response:
    caller = await request.app[AUTH].require_admin(request)
    api = request.app[ANALYTICS_API]
    if api.analytics is None:
        raise ApiError(503, "analytics/disabled", "Analytics is disabled on this daemon.")
    engine = request.app[ENGINE]
    if not engine.running:
        raise ApiError(503, "service/not-ready", "The job engine is not running yet.")
    today = date.fromisoformat(day_of(api.clock(), api.settings.timezone))
    day = _day(request, "day", today).isoformat()
    added = await engine.add(QUEUE, {"day": day, "trigger": "manual"}, job_id=JOB_ID)
    audit("analytics.run", caller.actor, f"queue:{QUEUE}", runId=added.run_id, day=day)
    return ok({"runId": added.run_id, "state": added.state, "created": added.created,
               "day": day}, status=202)


def routes(api: AnalyticsApi) -> Callable[[web.Application], None]:
    def add(app: web.Application) -> None:
        app[ANALYTICS_API] = api
        app.router.add_get(PATH, snapshots)
        app.router.add_post(RUN_PATH, run_now)
    return add
