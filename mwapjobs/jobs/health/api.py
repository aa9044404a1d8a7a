"""Integration health over HTTP (see sweep.py for what a check does).

- `GET /api/v1/integrations/health` (admin token or superadmin): counts by MWAP
  status, by health outcome and by provider, the sweep running now and the last
  one, and a page of integrations with the failing ones first.
- `POST /api/v1/integrations/health/check` (admin token or superadmin, audited):
  check every connected integration now, without spreading.
- `GET /api/v1/tenants/{tenantId}/integrations/{integrationId}/health` (the
  tenant's owner, a superadmin or an admin token, as for the manual refresh):
  the integration's current status and health, with its history newest first.
  An unknown integration, or one of another tenant, is a 404.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiohttp import web

from ...api.envelope import ApiError, ok
from ...api.keys import AUTH, ENGINE
from ...api.openapi import INTEGRATION_ID, PAGING, TENANT_ID, operation
from ...api.validation import path_id, query_int
from ...config import HealthSettings
from ...logs import audit
from ...storage.integrations import IntegrationStore
from ..providers import provider_kind
from .decide import OUTCOMES
from .schedule import QUEUE
from .sweep import HealthChecker

SUMMARY_PATH = "/api/v1/integrations/health"
CHECK_PATH = "/api/v1/integrations/health/check"
INTEGRATION_PATH = "/api/v1/tenants/{tenantId}/integrations/{integrationId}/health"
MAX_PAGE_SIZE = 200
OPENAPI = {
    SUMMARY_PATH: {"get": operation(
        "Integration health: counts by status and provider, failing integrations first "
        "(with when each one's failing streak began); `outcome` narrows the page",
        params=[*PAGING, {"name": "outcome", "in": "query", "schema": {"type": "string"},
                          "description": "comma-separated outcomes, e.g. failing,error"}],
        errors=("503",))},
    CHECK_PATH: {"post": operation(
        "Check every connected integration now, without spreading", ok_status="202",
        errors=("409", "503"))},
    INTEGRATION_PATH: {"get": operation(
        "One integration's health: current status and history",
        params=[TENANT_ID, INTEGRATION_ID], errors=("404", "503"))},
}


@dataclass(frozen=True)
class HealthApi:
    """What the endpoints need; `checker` is None when health checks are off here."""

    checker: HealthChecker | None
    store: IntegrationStore
    settings: HealthSettings


HEALTH_API: web.AppKey[HealthApi] = web.AppKey("health_api")
MWAP_STATUSES = ("active", "expired", "revoked", "error")
# Failing first: what is failing now, then what needs the tenant, then what we know least.
_RANK = {"error": 0, "failing": 1, "expired": 2, "revoked": 3, "skipped": 4, "unchecked": 5,
         "healthy": 6}
FAILED_OUTCOMES = ("failing", "error")  # what a failing streak is made of


def failing_since(history: list[Any]) -> tuple[Any, bool]:
    """When the current failing streak began, from a history oldest first: the time of
    its first failure, and whether the streak may be older still (the whole kept history
    is failures). (None, False) when the last check did not fail."""
    since = None
    for entry in reversed(history):
        if not isinstance(entry, dict) or entry.get("outcome") not in FAILED_OUTCOMES:
            return since, False
        since = entry.get("at")
    return since, since is not None


def _outcome(health: dict[str, Any] | None) -> str:
    last = (health or {}).get("lastResult")
    return str(last.get("outcome")) if isinstance(last, dict) else "unchecked"


def _provider_view(provider: dict[str, Any] | None, provider_id: str) -> dict[str, Any]:
    if provider is None:
        return {"id": provider_id, "name": None, "slug": None, "kind": None}
    return {"id": provider_id, "name": provider.get("name"), "slug": provider.get("slug"),
            "kind": provider_kind(provider)}


def _counts(values: list[str], keys: tuple[str, ...]) -> dict[str, int]:
    counted = Counter(values)
    return {**{k: counted.get(k, 0) for k in keys},
            **{k: n for k, n in counted.items() if k not in keys}}


def _health_view(health: dict[str, Any] | None) -> dict[str, Any]:
    health = health or {}
    return {
        "outcome": _outcome(health),
        "consecutiveFailures": int(health.get("consecutiveFailures") or 0),
        "lastCheckedAt": health.get("lastCheckedAt"),
        "lastHealthyAt": health.get("lastHealthyAt"),
        "lastFailureAt": health.get("lastFailureAt"),
        "lastResult": _entry_view(health.get("lastResult")),
        "statusSetByHealthCheck": health.get("setStatus"),
    }


async def summary(request: web.Request) -> web.Response:
    api = request.app[HEALTH_API]
    await request.app[AUTH].require_admin(request)
    page = query_int(request, "page", 1, 1, 1_000_000)
    size = query_int(request, "pageSize", 50, 1, MAX_PAGE_SIZE)
    known = (*OUTCOMES, "unchecked")
    wanted = [o for o in request.query.get("outcome", "").split(",") if o]
    if any(o not in known for o in wanted):
        raise ApiError(400, "validation/invalid-parameter",
                       f"outcome must be a comma-separated list of {', '.join(known)}")
    store = api.store
    integrations = await store.integrations_overview()
    health = await store.health_overview()
    providers = await store.providers_by_id()
    rows: list[dict[str, Any]] = []
    by_provider: dict[str, list[dict[str, Any]]] = {}
    for doc in integrations:
        integration_id = str(doc["_id"])
        state = health.get(integration_id)
        if not doc["connected"] and state is None:
            continue  # never connected, never checked: nothing to say about its health
        row = {"integrationId": integration_id, "tenantId": doc.get("tenantId"),
               "providerId": str(doc.get("providerId")), "status": doc.get("status") or "active",
               "connected": doc["connected"], "tokenExpiresAt": doc.get("tokenExpiresAt"),
               **_health_view(state)}
        rows.append(row)
        by_provider.setdefault(row["providerId"], []).append(row)
    rows.sort(key=lambda r: (_RANK.get(r["outcome"], 5), -r["consecutiveFailures"],
                             -_stamp(r["lastCheckedAt"]), r["integrationId"]))
    outcomes = known
    checker = api.checker
    matched = [r for r in rows if r["outcome"] in wanted] if wanted else rows
    shown = matched[(page - 1) * size: page * size]
    histories = await store.health_histories(
        [r["integrationId"] for r in shown if r["consecutiveFailures"]])
    for row in shown:
        row["failingSince"], row["failingSinceAtLeast"] = failing_since(
            histories.get(row["integrationId"], []))
    return ok({
        "total": len(rows),
        "connected": sum(1 for r in rows if r["connected"]),
        "byStatus": _counts([r["status"] for r in rows], MWAP_STATUSES),
        "byHealth": _counts([r["outcome"] for r in rows], outcomes),
        "byProvider": [
            {**_provider_view(providers.get(pid), pid), "total": len(members),
             "byStatus": _counts([r["status"] for r in members], MWAP_STATUSES),
             "byHealth": _counts([r["outcome"] for r in members], outcomes)}
            for pid, members in sorted(by_provider.items())
        ],
        "sweep": {
            "enabled": checker is not None,
            "schedule": {"spread": api.settings.spread, "cron": api.settings.cron,
                         "timezone": api.settings.timezone} if checker else None,
            "running": checker.progress() if checker else None,
            "last": checker.last_sweep if checker else None,
        },
        "items": shown,
        "matched": len(matched),
        "page": page,
        "pageSize": size,
    })


def _entry_view(entry: Any) -> dict[str, Any] | None:
    """One health-check result as the API shows it (our notes, field by field)."""
    if not isinstance(entry, dict):
        return None
    return {"at": entry.get("at"), "outcome": entry.get("outcome"),
            "status": entry.get("status"), "httpStatus": entry.get("httpStatus"),
            "latencyMs": entry.get("latencyMs"), "message": entry.get("message"),
            "refreshed": bool(entry.get("refreshed"))}


def _stamp(value: Any) -> float:
    return value.timestamp() if isinstance(value, datetime) else 0.0


async def check_now(request: web.Request) -> web.Response:
    caller = await request.app[AUTH].require_admin(request)
    checker = request.app[HEALTH_API].checker
    if checker is None:
        raise ApiError(503, "health/disabled", "Health checks are disabled on this daemon.")
    if not request.app[ENGINE].running:
        raise ApiError(503, "service/not-ready", "The job engine is not running yet.")
    outcome = await checker.check_now(caller.actor)
    audit("integration.health.check", caller.actor, f"queue:{QUEUE}", runId=outcome["runId"],
          created=outcome["created"], hurried=outcome["hurried"])
    if outcome["state"] == "active" and not outcome["hurried"]:
        raise ApiError(409, "health/sweep-running",
                       f"A health sweep (run {outcome['runId']}) is running on another "
                       "instance; it cannot be hurried from here.")
    return ok(outcome, status=202)


async def integration_health(request: web.Request) -> web.Response:
    tenant_id = path_id(request, "tenantId")
    integration_id = path_id(request, "integrationId")
    await request.app[AUTH].require_tenant_access(request, tenant_id)
    store = request.app[HEALTH_API].store
    integration = await store.get(integration_id)
    if integration is None or str(integration.get("tenantId")) != tenant_id:
        raise ApiError(404, "integration/not-found", "No such integration for this tenant.")
    provider_id = str(integration.get("providerId"))
    provider = await store.provider(provider_id)
    state = await store.state(str(integration["_id"])) or {}
    health = state.get("health") if isinstance(state.get("health"), dict) else {}
    history = [_entry_view(e) for e in reversed((health or {}).get("history") or [])]
    return ok({
        "integrationId": str(integration["_id"]),
        "tenantId": tenant_id,
        "provider": _provider_view(provider, provider_id),
        "status": integration.get("status") or "active",
        "connected": bool(integration.get("accessToken")),
        "tokenExpiresAt": integration.get("tokenExpiresAt"),
        "health": _health_view(health),
        "history": history,
    })


def routes(api: HealthApi) -> Callable[[web.Application], None]:
    def add(app: web.Application) -> None:
        app[HEALTH_API] = api
        app.router.add_get(SUMMARY_PATH, summary)
        app.router.add_post(CHECK_PATH, check_now)
        app.router.add_get(INTEGRATION_PATH, integration_health)
    return add
