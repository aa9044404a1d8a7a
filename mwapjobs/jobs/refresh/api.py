"""POST /api/v1/oauth/tenants/{tenantId}/integrations/{integrationId}/refresh

The seed's manual refresh: enqueue a high-priority refresh of one integration,
or with `?wait=true` wait (up to `refresh.wait_timeout`) and return the outcome.
The response describes the run; it never contains a token.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from aiohttp import web

from ..engine import as_utc
from ..jobs.token_refresh import MANUAL_PRIORITY, QUEUE, job_id, run_data
from ..logs import audit
from .envelope import ApiError, error, ok
from .keys import DAEMON
from .throttle import Throttle
from .validation import path_id, query_bool

PATH = "/api/v1/oauth/tenants/{tenantId}/integrations/{integrationId}/refresh"
# One manual refresh per integration per `refresh.manual_cooldown` seconds.
MANUAL_REFRESHES: web.AppKey[Throttle] = web.AppKey("manual_refreshes")


async def refresh_integration(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    tenant_id = path_id(request, "tenantId")
    integration_id = path_id(request, "integrationId")
    wait = query_bool(request, "wait")
    caller = await daemon.auth.require_tenant_access(request, tenant_id)
    if daemon.refresher is None:
        raise ApiError(503, "refresh/disabled", "Token refresh is disabled on this daemon.")
    if not daemon.engine.running:
        raise ApiError(503, "service/not-ready", "The job engine is not running yet.")
    integration = await daemon.integrations.get(integration_id)
    if integration is None or str(integration.get("tenantId")) != tenant_id:
        raise ApiError(404, "integration/not-found", "No such integration for this tenant.")
    if integration.get("status") == "revoked":
        raise ApiError(409, "integration/revoked",
                       "The integration is revoked; it is never refreshed.")
    if not integration.get("refreshToken"):
        raise ApiError(409, "integration/not-connected",
                       "The integration has no refresh token; the tenant must connect it.")
    key = str(integration["_id"])
    pending = (await daemon.engine.runs.pending_by_job(QUEUE, [job_id(key)])).get(job_id(key))
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
    expires = integration.get("tokenExpiresAt")
    deadline = as_utc(expires) if isinstance(expires, datetime) else None
    added = await daemon.engine.add(
        QUEUE, run_data(integration),
        job_id=job_id(str(integration["_id"])), priority=MANUAL_PRIORITY, replace=True,
        deadline=deadline if deadline and deadline > daemon.clock() else None,
    )
    audit("integration.refresh", caller.actor, f"integration:{integration['_id']}",
          tenantId=tenant_id, runId=added.run_id)
    if not wait:
        return ok({"runId": added.run_id, "state": added.state}, status=202)
    run = await daemon.operations.wait_finished(added.run_id,
                                                daemon.settings.refresh.wait_timeout)
    failure = run["error"]
    if failure and not caller.superadmin:
        failure = tenant_error(failure)  # a tenant owner: what happened, not the internals
    outcome = {"runId": run["runId"], "state": run["state"], "result": run["result"],
               "error": failure, "attempts": run["attemptsMade"]}
    return ok(outcome, status=200 if run["state"] in ("completed", "failed") else 202)


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


def add_routes(app: web.Application) -> None:
    app[MANUAL_REFRESHES] = Throttle(1, app[DAEMON].settings.refresh.manual_cooldown)
    app.router.add_post(PATH, refresh_integration)
