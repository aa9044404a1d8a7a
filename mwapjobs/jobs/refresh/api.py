"""POST /api/v1/oauth/tenants/{tenantId}/integrations/{integrationId}/refresh

The seed's manual refresh: enqueue a high-priority refresh of one integration,
or with `?wait=true` wait (up to `refresh.wait_timeout`) and return the outcome.
The response describes the run; it never contains a token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiohttp import web

from ...api.envelope import ApiError, error, ok
from ...api.keys import AUTH, ENGINE, READY_DETAILS
from ...api.openapi import INTEGRATION_ID, TENANT_ID, operation
from ...api.throttle import Throttle
from ...api.validation import path_id, query_bool
from ...config import RefreshSettings
from ...logs import audit
from ...operations import run_view
from ...storage.integrations import IntegrationStore
from .now import refresh_now
from .runs import QUEUE, job_id

PATH = "/api/v1/oauth/tenants/{tenantId}/integrations/{integrationId}/refresh"
OPENAPI = {PATH: {"post": operation(
    "Refresh one integration's token now (high priority); ?wait=true waits",
    params=[TENANT_ID, INTEGRATION_ID,
            {"name": "wait", "in": "query", "schema": {"type": "boolean"}}],
    ok_status="202", errors=("404", "409", "429", "503"))}}


@dataclass(frozen=True)
class RefreshApi:
    """What the endpoint needs; `enabled` is False when this daemon does not refresh."""

    enabled: bool
    store: IntegrationStore
    settings: RefreshSettings
    clock: Callable[[], datetime]


REFRESH_API: web.AppKey[RefreshApi] = web.AppKey("refresh_api")
# One manual refresh per integration per `refresh.manual_cooldown` seconds.
MANUAL_REFRESHES: web.AppKey[Throttle] = web.AppKey("manual_refreshes")


async def refresh_integration(request: web.Request) -> web.Response:
    api = request.app[REFRESH_API]
    engine = request.app[ENGINE]
    tenant_id = path_id(request, "tenantId")
    integration_id = path_id(request, "integrationId")
    wait = query_bool(request, "wait")
    caller = await request.app[AUTH].require_tenant_access(request, tenant_id)
    if not api.enabled:
        raise ApiError(503, "refresh/disabled", "Token refresh is disabled on this daemon.")
    if not engine.running:
        raise ApiError(503, "service/not-ready", "The job engine is not running yet.")
    integration = await api.store.get(integration_id)
    if integration is None or str(integration.get("tenantId")) != tenant_id:
        raise ApiError(404, "integration/not-found", "No such integration for this tenant.")
    if integration.get("status") == "revoked":
        raise ApiError(409, "integration/revoked",
                       "The integration is revoked; it is never refreshed.")
    if not integration.get("refreshToken"):
        raise ApiError(409, "integration/not-connected",
                       "The integration has no refresh token; the tenant must connect it.")
    key = str(integration["_id"])
    pending = (await engine.runs.pending_by_job(QUEUE, [job_id(key)])).get(job_id(key))
    if pending is None or pending["state"] == "delayed":  # this call starts a refresh
        cooldown = request.app[MANUAL_REFRESHES]
        wait_for = cooldown.retry_after(key)
        if wait_for is not None:  # each refresh spends the platform's shared OAuth client
            seconds = int(wait_for) + 1
            response = error(429, "refresh/too-soon", "This integration was refreshed by "
                             f"hand moments ago; try again in {seconds} s.")
            response.headers["Retry-After"] = str(seconds)
            return response
        cooldown.hit(key)
    added = await refresh_now(engine, integration, api.clock())
    audit("integration.refresh", caller.actor, f"integration:{integration['_id']}",
          tenantId=tenant_id, runId=added.run_id)
    if not wait:
        return ok({"runId": added.run_id, "state": added.state}, status=202)
    run = await added.settled(api.settings.wait_timeout)
    if run is None:  # removed by an operator meanwhile
        raise ApiError(404, "run/not-found", "The refresh run was removed meanwhile.")
    view = run_view(run)
    failure = view["error"]
    if failure and not caller.superadmin:
        failure = tenant_error(failure)  # a tenant owner: what happened, not the internals
    outcome = {"runId": view["runId"], "state": view["state"], "result": view["result"],
               "error": failure, "attempts": view["attemptsMade"]}
    return ok(outcome, status=200 if view["state"] in ("completed", "failed") else 202)


# What a tenant owner is told about a refresh that did not succeed, by the error's type:
# a code and a sentence. Admins (and superadmins) get the scrubbed error itself.
_TENANT_MESSAGES = {
    "RefreshFailed": ("refresh/grant-refused", "The provider no longer accepts this "
                      "connection's authorization: reconnect the integration."),
    "TransientError": ("refresh/provider-unavailable", "The provider could not refresh the "
                       "token just now; it is retried automatically."),
    "TimeoutError": ("refresh/provider-unavailable", "The provider did not answer in time; "
                     "the refresh is retried automatically."),
}


def tenant_error(error: dict[str, Any]) -> dict[str, Any]:
    code, message = _TENANT_MESSAGES.get(str(error.get("type")), (
        "refresh/failed", "The token could not be refreshed; the operators have the details."))
    return {"code": code, "message": message, "permanent": bool(error.get("permanent"))}


def discovery_mode(mode: Callable[[], str]) -> Callable[[web.Application], None]:
    """`/readyz` says how discovery follows the backend's writes: `"discovery"` is
    "change-stream", "polling", or "off" (not the leader, or refresh is off)."""
    def add(app: web.Application) -> None:
        app[READY_DETAILS].append(lambda: {"discovery": mode()})
    return add


def routes(api: RefreshApi) -> Callable[[web.Application], None]:
    def add(app: web.Application) -> None:
        app[REFRESH_API] = api
        app[MANUAL_REFRESHES] = Throttle(1, api.settings.manual_cooldown)
        app.router.add_post(PATH, refresh_integration)
    return add
