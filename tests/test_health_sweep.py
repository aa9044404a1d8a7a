"""Health-check sweeps: each row of the rules (what a probe's answer does to the
integration, its health notes and the tenant's notifications), and batched writes.

A sweep is `HealthChecker.sweep`, awaited, so a test sees every write of the sweep
when it returns (tests/support/health_world.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from contextvars import ContextVar
from datetime import timedelta
from typing import Any

import pytest

from mwapjobs.daemon import Daemon
from mwapjobs.jobs.health import sweep as health_check
from mwapjobs.jobs.health.schedule import offset_fraction
from mwapjobs.jobs.health.sweep import SweepReport
from mwapjobs.jobs.refresh.runs import MANUAL_PRIORITY
from mwapjobs.storage.integrations import IntegrationStore
from mwapjobs.storage.mongo import Mongo
from mwapjobs.storage.names import INTEGRATION_STATE
from mwapjobs.storage.providers import ProviderHolds
from tests.conftest import make_settings, wait_for
from tests.support import health_world
from tests.support.health_world import CID, SECRET, World, closed_port, world
from tests.support.mwap_data import (
    insert_integration,
    insert_provider,
    integration_state,
    notifications,
    refresh_runs,
    test_cipher,
    update_integration,
    utcnow,
)
from tests.support.oauth_server import Fault, OAuthServer
from tests.support.providers import KINDS, ProviderServer, Reply

# This module's fixtures (tests/support/health_world.py); tests/conftest.py's `oauth`
# and `oauth_server` are the token-refresh tests'.
oauth_server = health_world.oauth_server
oauth = health_world.oauth
providers = health_world.providers
w = health_world.w


# -- sweeps: each row of the rules --------------------------------------------------------


async def test_healthy_integrations_are_recorded_with_their_history(w: World) -> None:
    ids = [(await w.integration(kind))[0] for kind in KINDS]
    report = await w.sweep()
    assert (report.integrations, report.checked, report.healthy) == (4, 4, 4)
    for iid in ids:
        health = await w.health(iid)
        last = health["lastResult"]
        assert (last["outcome"], last["status"], last["httpStatus"]) == ("healthy", "active", 200)
        assert last["latencyMs"] >= 0 and last["message"] == "HTTP 200"
        assert health["consecutiveFailures"] == 0 and health["history"] == [last]
        assert health["lastHealthyAt"] == last["at"] == health["lastCheckedAt"]
        assert (await w.doc(iid))["status"] == "active"
    for _ in range(6):
        await w.sweep()
    history = (await w.health(ids[0]))["history"]
    assert len(history) == 5  # health.history_size
    assert [h["at"] for h in history] == sorted(h["at"] for h in history)


async def test_never_probes_revoked_or_unconnected_integrations(w: World) -> None:
    revoked, revoked_token = await w.integration("google", status="revoked")
    unconnected, _ = await w.integration("google", access_token=None)
    report = await w.sweep()
    assert report.integrations == 0 and w.api.requests == []
    assert (await w.doc(revoked))["status"] == "revoked"
    assert await integration_state(w.mongo, revoked) is None
    assert await integration_state(w.mongo, unconnected) is None
    assert revoked_token not in w.api.tokens_seen()


async def test_a_stale_token_is_refreshed_at_high_priority_then_probed_again(w: World) -> None:
    iid, old = await w.integration("dropbox")
    w.api.reply(old, Reply.unauthorized())
    report = await w.sweep()
    assert (report.healthy, report.refreshed) == (1, 1)
    doc = await w.doc(iid)
    new = test_cipher().decrypt(doc["accessToken"])
    assert new != old and doc["status"] == "active"
    assert w.api.tokens_seen() == [old, new]
    [run] = await refresh_runs(w.mongo, iid, ("waiting", "active", "completed", "failed"))
    assert (run["state"], run["priority"]) == ("completed", MANUAL_PRIORITY)
    assert [r.path for r in w.oauth.requests] == ["/oauth/token"]
    last = (await w.health(iid))["lastResult"]
    assert (last["outcome"], last["refreshed"]) == ("healthy", True)
    assert await notifications(w.mongo, iid) == []


async def test_a_token_past_its_expiry_is_refreshed_before_any_probe(w: World) -> None:
    iid, old = await w.integration("google", expires_in=-60)
    report = await w.sweep()
    assert (report.healthy, report.refreshed) == (1, 1)
    new = test_cipher().decrypt((await w.doc(iid))["accessToken"])
    assert w.api.tokens_seen() == [new]  # the expired token was never sent
    assert old not in w.api.tokens_seen()


async def test_a_refused_refresh_makes_it_expired_with_one_notification(w: World) -> None:
    iid, old = await w.integration("microsoft")
    doc = await w.doc(iid)
    w.oauth.revoke(test_cipher().decrypt(doc["refreshToken"]))
    w.api.reply(old, Reply.unauthorized())
    report = await w.sweep()
    assert report.expired == 1
    assert (await w.doc(iid))["status"] == "expired"
    [note] = await notifications(w.mongo, iid)
    assert note["kind"] == "integration.expired" and "invalid_grant" in note["reason"]
    health = await w.health(iid)
    assert health["lastResult"]["outcome"] == "expired"
    assert health["setStatus"] is None  # the refresher set it; a later 200 must not undo it
    w.api.reply(old, Reply.ok())
    await w.sweep()
    assert (await w.doc(iid))["status"] == "expired"
    assert await w.outcome(iid) == "healthy"


async def test_a_refresh_that_fails_for_now_is_a_counted_failure(w: World) -> None:
    iid, old = await w.integration("google", expires_in=7200)
    w.api.reply(old, Reply.unauthorized())
    w.oauth.script(Fault(503), Fault(503))  # both attempts of the refresh run
    report = await w.sweep()
    assert report.failing == 1
    health = await w.health(iid)
    assert health["consecutiveFailures"] == 1
    assert "did not succeed" in health["lastResult"]["message"]
    assert (await w.doc(iid))["status"] == "active"


async def test_a_held_provider_never_expires_or_fails_its_tenants(
        w: World, monkeypatch: pytest.MonkeyPatch) -> None:
    stale, stale_token = await w.integration("google")
    past, _ = await w.integration("google", expires_in=-60)  # refreshed before any probe
    w.api.reply(stale_token, Reply.unauthorized())
    w.oauth.add_client(CID, "rotated-at-the-provider")  # our client secret is now wrong
    before = {iid: await w.doc(iid) for iid in (stale, past)}
    started = time.monotonic()

    report = await w.sweep()

    assert time.monotonic() - started < 5  # a postponed refresh is not waited out
    assert (report.skipped, report.expired, report.failing, report.error) == (2, 0, 0, 0)
    hold = (await ProviderHolds(w.mongo).state(w.provider["google"].hex) or {}).get("hold")
    assert hold is not None and hold["error"] == "invalid_client"
    refused = len([r for r in w.oauth.requests if r.path == "/oauth/token"])
    assert 1 <= refused <= 2  # those in flight before the hold was known; then none
    for _ in range(3):  # failure_threshold sweeps: still nothing counted or changed
        report = await w.sweep()
        assert (report.skipped, report.failing, report.error) == (2, 0, 0)
    for iid in (stale, past):
        assert await w.doc(iid) == before[iid]
        assert await notifications(w.mongo, iid) == []
        health = await w.health(iid)
        assert health["consecutiveFailures"] == 0 and health["setStatus"] is None
        assert health["lastResult"]["outcome"] == "skipped"
        assert "provider is on hold" in health["lastResult"]["message"]
        assert "status unchanged" in health["lastResult"]["message"]
    assert len([r for r in w.oauth.requests if r.path == "/oauth/token"]) == refused


async def test_a_401_without_a_refresh_token_makes_it_expired(w: World) -> None:
    iid, old = await w.integration("generic", refresh=False)
    w.api.reply(old, Reply.unauthorized())
    await w.sweep()
    assert (await w.doc(iid))["status"] == "expired"
    [note] = await notifications(w.mongo, iid)
    assert note["kind"] == "integration.expired" and "no refresh token" in note["reason"]
    assert (await w.health(iid))["setStatus"] == "expired"
    assert w.oauth.requests == []


async def test_a_401_that_persists_after_the_refresh_is_a_failure_not_revoked(w: World) -> None:
    iid, _ = await w.integration("google")
    w.api.default = Reply.unauthorized()  # the freshly refreshed token is refused too
    await w.sweep()
    assert (await w.doc(iid))["status"] == "active"
    health = await w.health(iid)
    assert health["consecutiveFailures"] == 1
    assert "even just after a token refresh" in health["lastResult"]["message"]


async def test_an_explicit_revocation_makes_it_revoked_without_a_refresh(w: World) -> None:
    iid, old = await w.integration("dropbox")
    w.api.reply(old, Reply.suspended())
    report = await w.sweep()
    assert report.revoked == 1
    assert (await w.doc(iid))["status"] == "revoked"
    [note] = await notifications(w.mongo, iid)
    assert note["kind"] == "integration.revoked" and "user_suspended" in note["reason"]
    assert note["tenantId"] == w.tenant_a and note["createdAt"]
    assert w.oauth.requests == []
    await w.sweep()  # revoked: never probed again
    assert w.api.tokens_seen() == [old]


async def test_403_expires_unless_it_is_a_rate_limit_and_a_200_undoes_our_expired(
        w: World) -> None:
    denied, denied_token = await w.integration("google")
    limited, limited_token = await w.integration("google")
    w.api.reply(denied_token, Reply.forbidden())
    w.api.reply(limited_token, Reply.rate_limited_403())
    await w.sweep()
    assert (await w.doc(denied))["status"] == "expired"
    assert [n["kind"] for n in await notifications(w.mongo, denied)] == ["integration.expired"]
    assert (await w.doc(limited))["status"] == "active"
    assert await w.outcome(limited) == "failing"
    assert await notifications(w.mongo, limited) == []

    w.api.reply(denied_token, Reply.ok())
    await w.sweep()
    assert (await w.doc(denied))["status"] == "active"  # we set expired, so we undo it
    assert (await w.health(denied))["setStatus"] is None
    assert len(await notifications(w.mongo, denied)) == 1


async def test_an_expired_or_error_status_we_did_not_set_is_left_alone(w: World) -> None:
    expired, _ = await w.integration("google", status="expired")
    error, _ = await w.integration("microsoft", status="error")
    await w.sweep()
    assert (await w.doc(expired))["status"] == "expired"
    assert (await w.doc(error))["status"] == "error"
    assert await w.outcome(expired) == await w.outcome(error) == "healthy"


async def test_transient_failures_become_error_only_at_the_threshold(
        w: World, caplog: pytest.LogCaptureFixture) -> None:
    flaky, flaky_token = await w.integration("dropbox")
    hiccup, hiccup_token = await w.integration("google")
    w.api.script(flaky_token, Reply.error(500), Reply.hang_forever(), Reply.wrong_json(),
                 Reply.not_json(), Reply.ok())
    w.api.script(hiccup_token, Reply.error(502), Reply.error(503), Reply.ok(), Reply.error(500),
                 Reply.error(500))
    expected = [("failing", "active", 1), ("failing", "active", 2), ("error", "error", 3),
                ("error", "error", 4), ("healthy", "active", 0)]
    with caplog.at_level(logging.WARNING, logger="mwapjobs.jobs.health_check"):
        for outcome, status, streak in expected:
            await w.sweep()
            health = await w.health(flaky)
            assert (health["lastResult"]["outcome"], (await w.doc(flaky))["status"],
                    health["consecutiveFailures"]) == (outcome, status, streak)
            assert (await w.doc(hiccup))["status"] == "active"  # never 3 failures in a row
    assert (await w.health(hiccup))["consecutiveFailures"] == 2
    messages = [h["message"] for h in (await w.health(flaky))["history"]]
    assert "HTTP 500" in messages[0] and "no answer within" in messages[1]
    assert "no 'account_id'" in messages[2] and "not JSON" in messages[3]
    logged = [r for r in caplog.records if r.getMessage() == "health check failed"
              and getattr(r, "integrationId", None) == flaky]
    assert len(logged) == 4  # every failure is logged, not only the one that changed things
    assert await notifications(w.mongo, flaky) == []


async def test_network_errors_count_towards_error(mongo: Mongo, oauth: OAuthServer,
                                                   providers: ProviderServer) -> None:
    async with world(mongo, oauth, providers, failure_threshold=2) as w:
        down = await insert_provider(
            mongo, test_cipher(), token_url=oauth.token_url, client_id=CID,
            client_secret=SECRET, name="Down",
            metadata={"providerType": "google",
                      "healthCheckUrl": f"http://127.0.0.1:{closed_port()}/about"})
        w.provider["down"] = down
        iid, _ = await w.integration("down")
        await w.sweep()
        assert (await w.doc(iid))["status"] == "active"
        await w.sweep()
        assert (await w.doc(iid))["status"] == "error"
        assert "network error" in (await w.health(iid))["lastResult"]["message"]


async def test_a_provider_without_a_probe_url_is_skipped(w: World) -> None:
    bare = await insert_provider(w.mongo, test_cipher(), token_url=w.oauth.token_url,
                                 client_id=CID, client_secret=SECRET, name="Bare",
                                 metadata={"providerType": "test"})
    w.provider["bare"] = bare
    iid, _ = await w.integration("bare")
    report = await w.sweep()
    assert report.skipped == 1
    health = await w.health(iid)
    assert health["lastResult"]["outcome"] == "skipped"
    assert "metadata.healthCheckUrl" in health["lastResult"]["message"]


async def test_a_token_changed_during_a_spread_sweep_is_read_again(
        w: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(health_check, "TOKEN_MAX_AGE", 0.05)
    iid = next(f"{n:024x}" for n in range(1000) if 0.5 < offset_fraction(f"{n:024x}") < 0.9)
    await w.integration("google", integration_id=iid)
    sweep = asyncio.ensure_future(w.sweep(window=1.0))
    await wait_for(lambda: w.checker.progress() is not None, message="sweep planned")
    await update_integration(w.mongo, iid, {"accessToken": test_cipher().encrypt("at-reconnected")})
    await sweep
    assert w.api.tokens_seen() == ["at-reconnected"]


# -- batched writes ---------------------------------------------------------------------------


async def test_record_health_updates_only_its_batch_in_one_query(mongo: Mongo) -> None:
    store = IntegrationStore(mongo)
    ids = [f"{n:024x}" for n in range(11)]
    await store.create_health_states(ids[:10])
    # Notes the refresher made (no health yet), inside the range of the batch:
    await mongo.call(lambda db: db[INTEGRATION_STATE].insert_one(
        {"_id": ids[10][:-1] + "4z", "refreshFailure": {"token": "t"}}))
    ids[10] = ids[10][:-1] + "4z"
    await mongo.call(lambda db: db[INTEGRATION_STATE].update_one(
        {"_id": ids[3]}, {"$set": {"health.consecutiveFailures": 2, "refreshFailure": {"x": 1}}}))
    before = {d["_id"]: d for d in await mongo.call(
        lambda db: db[INTEGRATION_STATE].find({}).to_list(None))}
    now = utcnow()
    now = now.replace(microsecond=now.microsecond // 1000 * 1000)  # BSON keeps milliseconds

    def result(n: int, streak: int) -> tuple[str, dict[str, Any]]:
        entry = {"at": now, "outcome": f"o{n}", "latencyMs": float(n)}
        return ids[n], {"at": now, "entry": entry, "consecutiveFailures": streak,
                        "setStatus": None, "lastHealthyAt": None, "lastFailureAt": now,
                        "tenantId": "t", "providerId": "p"}

    trips = mongo.round_trips
    changed = await store.record_health([result(1, 1), result(3, 3), result(5, 0),
                                         result(7, 0)], history_size=2)
    assert mongo.round_trips - trips == 1 and changed == 4
    after = {d["_id"]: d for d in await mongo.call(
        lambda db: db[INTEGRATION_STATE].find({}).to_list(None))}
    for n in (0, 2, 4, 6, 8, 9, 10):
        assert after[ids[n]] == before[ids[n]]  # in the id range or not: untouched
    assert after[ids[3]]["health"]["consecutiveFailures"] == 3
    assert after[ids[3]]["refreshFailure"] == {"x": 1}
    assert after[ids[1]]["health"]["consecutiveFailures"] == 1
    assert after[ids[5]]["health"]["lastFailureAt"] == now
    assert after[ids[5]]["health"]["lastResult"]["outcome"] == "o5"
    assert after[ids[5]]["health"]["history"][0]["outcome"] == "o5"
    for _ in range(3):
        await store.record_health([result(5, 1)], history_size=2)
    assert len((await store.state(ids[5]) or {})["health"]["history"]) == 2


async def test_a_large_sweep_writes_in_a_few_batches(w: World,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    for n in range(300):
        await w.integration(KINDS[n % 4], refresh=False)
    # Count only the sweep's own queries: those made in its task and the tasks it starts
    # (they inherit its context), not the daemon's background traffic meanwhile.
    in_sweep: ContextVar[bool] = ContextVar("in_sweep", default=False)
    trips = 0
    call = w.mongo.call

    async def counted(op: Any) -> Any:
        nonlocal trips
        trips += in_sweep.get()
        return await call(op)

    monkeypatch.setattr(w.mongo, "call", counted)

    async def sweep() -> SweepReport:
        in_sweep.set(True)
        return await w.sweep()

    report = await asyncio.create_task(sweep())
    assert report.healthy == 300 and report.writes <= 10
    # reads (3) + missing notes (1) + batched results: nothing per integration
    assert 0 < trips <= 4 + report.writes
    states = await w.mongo.call(lambda db: db[INTEGRATION_STATE].find({}).to_list(None))
    assert sorted(len(s["health"]["history"]) for s in states) == [1] * 300

# -- token refresh switched off -------------------------------------------------------------


async def test_token_refresh_disabled_makes_a_401_a_plain_failure(
        mongo: Mongo, oauth: OAuthServer, providers: ProviderServer) -> None:
    settings = make_settings(refresh={"enabled": False}, health={"request_timeout": 0.5})
    provider = await insert_provider(mongo, test_cipher(), token_url=oauth.token_url,
                                     client_id=CID, client_secret=SECRET,
                                     metadata=providers.metadata("google"))
    iid = await insert_integration(mongo, test_cipher(), provider=provider, tenant_id="t1",
                                   access_token="at-stale", expires_in=timedelta(hours=1)
                                   .total_seconds())
    providers.reply("at-stale", Reply.unauthorized())
    daemon = Daemon(settings, mongo=mongo)
    await daemon.start()
    try:
        await daemon.wait_ready()
        assert daemon.jobs["refresh"] is None and daemon.jobs["health"] is not None
        report = await daemon.jobs["health"].sweep()
        assert report.failing == 1
        state = await integration_state(mongo, iid)
        assert state is not None
        assert "token refresh is disabled" in state["health"]["lastResult"]["message"]
    finally:
        await daemon.stop()
