"""The health-check HTTP API: check now (admin only, audited, hurrying a running sweep),
the summary, and one integration's health with the refresh endpoint's access rules."""

from __future__ import annotations

import json
import logging

import pytest
from bson import ObjectId

from mwapjobs.jobs.health.api import failing_since
from mwapjobs.jobs.health.schedule import QUEUE, SWEEP_JOB_ID
from mwapjobs.storage.names import RUNS
from tests.conftest import wait_for
from tests.support import health_world
from tests.support.health_world import OWNER_A, OWNER_B, World
from tests.support.mwap_data import insert_superadmin
from tests.support.providers import Reply

# This module's fixtures (tests/support/health_world.py); tests/conftest.py's `oauth`
# and `oauth_server` are the token-refresh tests'.
oauth_server = health_world.oauth_server
oauth = health_world.oauth
providers = health_world.providers
api = health_world.api


# -- the HTTP API -----------------------------------------------------------------------------


async def test_check_now_is_admin_only_audited_and_unspread(
        api: World, caplog: pytest.LogCaptureFixture) -> None:
    await api.integration("google")
    assert (await api.http("POST", "/api/v1/integrations/health/check", who=None))[0] == 401
    status, body = await api.http("POST", "/api/v1/integrations/health/check", who=OWNER_A)
    assert (status, body["error"]["code"]) == (403, "auth/forbidden")
    with caplog.at_level(logging.WARNING, logger="mwapjobs.audit"):
        status, body = await api.http("POST", "/api/v1/integrations/health/check")
    assert status == 202 and body["data"]["created"] is True
    run_id = body["data"]["runId"]
    run = await api.daemon.engine.wait_settled(run_id, 10)
    assert run["state"] == "completed" and run["result"]["healthy"] == 1
    assert run["result"]["window"] == 0.0 and run["data"]["requestedBy"] == "token:ops"
    events = [getattr(r, "audit_event", None) for r in caplog.records]
    assert any(e and e["action"] == "integration.health.check" and e["actor"] == "token:ops"
               and e["runId"] == run_id for e in events)


async def test_check_now_hurries_a_spread_sweep_running_here(api: World) -> None:
    for _ in range(3):
        await api.integration("google", refresh=False)
    # A scheduled sweep of a one-minute interval: its probes spread over 48 s.
    added = await api.daemon.engine.add(QUEUE, {"spread": True, "every": 60},
                                        job_id=SWEEP_JOB_ID)
    await wait_for(lambda: api.checker.progress() is not None, message="spread sweep running")
    progress = api.checker.progress()
    assert progress is not None and progress["window"] > 40
    status, body = await api.http("POST", "/api/v1/integrations/health/check")
    assert status == 202
    assert body["data"] == {"runId": added.run_id, "state": "active", "created": False,
                            "hurried": True}
    run = await added.settled(5)
    assert run["state"] == "completed"
    assert run["result"]["hurried"] is True and run["result"]["healthy"] == 3


async def test_check_now_replaces_a_waiting_sweep_and_refuses_one_running_elsewhere(
        api: World) -> None:
    await api.integration("google", refresh=False)
    engine = api.daemon.engine
    await engine.set_paused(QUEUE, True)
    health = api.checker.settings
    waiting = await engine.add(QUEUE, {"spread": True, "cron": health.cron,
                                       "timezone": health.timezone}, job_id=SWEEP_JOB_ID)
    status, body = await api.http("POST", "/api/v1/integrations/health/check")
    assert status == 202
    assert body["data"] == {"runId": waiting.run_id, "state": "waiting", "created": False,
                            "hurried": False}
    run = await api.daemon.operations.get_run(waiting.run_id)
    assert run["data"]["spread"] is False  # the waiting scheduled sweep became "now"
    # The same run, claimed by another instance: nothing to hurry here.
    await api.mongo.call(lambda db: db[RUNS].update_one(
        {"_id": ObjectId(waiting.run_id)}, {"$set": {"state": "active", "leaseOwner": "other"}}))
    status, body = await api.http("POST", "/api/v1/integrations/health/check")
    assert (status, body["error"]["code"]) == (409, "health/sweep-running")
    await api.mongo.call(lambda db: db[RUNS].delete_one({"_id": ObjectId(waiting.run_id)}))
    await engine.set_paused(QUEUE, False)


async def test_health_summary_puts_failing_integrations_first(api: World) -> None:
    healthy, _ = await api.integration("google")
    failing, failing_token = await api.integration("dropbox")
    denied, denied_token = await api.integration("microsoft")
    await api.integration("generic", access_token=None)  # never connected: not listed
    api.api.reply(failing_token, Reply.error(500))
    api.api.reply(denied_token, Reply.forbidden())
    await api.sweep()
    await api.sweep()
    assert (await api.http("GET", "/api/v1/integrations/health", who=OWNER_A))[0] == 403
    status, body = await api.http("GET", "/api/v1/integrations/health?pageSize=2")
    assert status == 200
    data = body["data"]
    assert (data["total"], data["connected"]) == (3, 3)
    assert data["byStatus"] == {"active": 2, "expired": 1, "revoked": 0, "error": 0}
    assert data["byHealth"]["healthy"] == 1 and data["byHealth"]["failing"] == 1
    assert data["byHealth"]["expired"] == 1
    kinds = {p["kind"]: p for p in data["byProvider"]}
    assert kinds["dropbox"]["byHealth"]["failing"] == 1 and kinds["google"]["total"] == 1
    assert [i["integrationId"] for i in data["items"]] == [failing, denied]
    assert data["items"][0]["consecutiveFailures"] == 2
    status, body = await api.http("GET", "/api/v1/integrations/health?page=2&pageSize=2")
    assert [i["integrationId"] for i in body["data"]["items"]] == [healthy]
    assert body["data"]["sweep"]["last"]["healthy"] == 1
    assert body["data"]["sweep"]["schedule"]["cron"] == "0 */4 * * *"


async def test_the_failing_list_says_since_when_and_how_many_more(api: World) -> None:
    await api.integration("google")
    flaky, flaky_token = await api.integration("dropbox")
    down, down_token = await api.integration("dropbox")
    api.api.reply(down_token, Reply.error(500))
    await api.sweep()  # down fails once; flaky is healthy
    api.api.reply(flaky_token, Reply.error(503))
    await api.sweep()  # down fails again; flaky's streak begins
    status, body = await api.http("GET", "/api/v1/integrations/health")
    history = {i["integrationId"]: i for i in body["data"]["items"]}
    status, one = await api.http(
        "GET", f"/api/v1/tenants/{history[flaky]['tenantId']}/integrations/{flaky}/health")
    flaky_first_failure = one["data"]["history"][0]["at"]  # newest first: the only failure
    status, body = await api.http(
        "GET", "/api/v1/integrations/health?outcome=failing,error&pageSize=1")
    assert status == 200, body
    data = body["data"]
    assert data["matched"] == 2 and data["total"] == 3
    [first] = data["items"]
    assert first["integrationId"] == down and first["consecutiveFailures"] == 2
    # Its whole kept history is failures: the streak may be older than the first entry.
    assert first["failingSinceAtLeast"] is True and first["failingSince"]
    status, body = await api.http(
        "GET", "/api/v1/integrations/health?outcome=failing,error&pageSize=1&page=2")
    [second] = body["data"]["items"]
    assert second["integrationId"] == flaky and second["consecutiveFailures"] == 1
    assert second["failingSince"] == flaky_first_failure
    assert second["failingSinceAtLeast"] is False
    status, body = await api.http("GET", "/api/v1/integrations/health?outcome=broken")
    assert status == 400 and body["error"]["code"] == "validation/invalid-parameter"


def test_failing_since_is_the_first_failure_of_the_current_streak() -> None:
    def h(*outcomes: str) -> list[dict[str, object]]:
        return [{"at": f"t{i}", "outcome": o} for i, o in enumerate(outcomes)]

    assert failing_since([]) == (None, False)
    assert failing_since(h("failing", "healthy")) == (None, False)
    assert failing_since(h("healthy", "failing", "error")) == ("t1", False)
    assert failing_since(h("failing", "skipped", "failing")) == ("t2", False)
    assert failing_since(h("error", "failing")) == ("t0", True)


async def test_integration_health_follows_the_refresh_endpoint_rules(api: World) -> None:
    mine, token = await api.integration("google")
    theirs, _ = await api.integration("google", tenant=api.tenant_b)
    await insert_superadmin(api.mongo, "auth0|root")
    api.api.script(token, Reply.error(503))
    await api.sweep()
    await api.sweep()
    path = "/api/v1/tenants/{t}/integrations/{i}/health"
    for who in (OWNER_A, "auth0|root", "admin"):
        status, body = await api.http("GET", path.format(t=api.tenant_a, i=mine), who=who)
        assert status == 200, (who, body)
        data = body["data"]
        assert (data["integrationId"], data["status"], data["provider"]["kind"]) == (
            mine, "active", "google")
        assert [h["outcome"] for h in data["history"]] == ["healthy", "failing"]  # newest first
        assert data["history"][1]["httpStatus"] == 503
        assert data["health"]["outcome"] == "healthy"
        assert "accessToken" not in json.dumps(body) and token not in json.dumps(body)
    status, _ = await api.http("GET", path.format(t=api.tenant_b, i=mine), who=OWNER_A)
    assert status == 403  # not the owner of tenant B
    status, body = await api.http("GET", path.format(t=api.tenant_b, i=mine), who=OWNER_B)
    assert (status, body["error"]["code"]) == (404, "integration/not-found")
    status, _ = await api.http("GET", path.format(t=api.tenant_a, i=theirs), who=OWNER_A)
    assert status == 404
    status, _ = await api.http("GET", path.format(t=api.tenant_a, i="f" * 24), who="admin")
    assert status == 404
    assert (await api.http("GET", path.format(t=api.tenant_a, i=mine), who=None))[0] == 401
    assert (await api.http("GET", path.format(t=api.tenant_a, i="bad$id")))[0] == 400
