"""Token refresh inside a running daemon (in-process, on the test's database), against a
real Authlib token endpoint: a due integration is refreshed at once; retries with backoff
bounded by the token's expiry; permanent failures; the cycle's next refresh for the new
tokens; races with the backend; revoked integrations; the per-provider limits; and a
provider's own configuration error holding the provider, not its tenants.

The handler alone (the request, the write-back, how answers are classified) is in
test_refresh_handler.py; the shared world is tests/support/refresh_world.py.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

import pytest

from mwapjobs.alerts import AlertManager
from mwapjobs.alerts.rules import Rule
from mwapjobs.daemon import Daemon
from mwapjobs.jobs.refresh.cycle import due_time
from mwapjobs.jobs.refresh.rules import provider_on_hold
from mwapjobs.jobs.refresh.runs import connection_fingerprint
from mwapjobs.storage.mongo import Mongo
from mwapjobs.storage.names import PROVIDERS
from mwapjobs.storage.providers import ProviderHolds
from tests.conftest import wait_for
from tests.support.mwap_data import (
    as_utc,
    integration_state,
    new_hex_id,
    notifications,
    pending_refresh_runs,
    refresh_runs,
    update_integration,
    utcnow,
)
from tests.support.oauth_server import Fault, Hang
from tests.support.refresh_world import (
    CID,
    SECRET,
    DiscoveryPasses,
    World,
    assert_given_up,
    close_to,
    daemon_settings,
    finished_run,
    issued,
    meter,
    running,
    token_requests,
)

# -- the whole daemon ---------------------------------------------------------------------------


async def test_a_due_integration_is_refreshed_at_once_by_the_daemon(world: World) -> None:
    provider = await world.provider(rotate=True)
    iid, _ = await world.integration(provider, expires_in=30)  # lead 60: due already
    later, _ = await world.integration(provider, expires_in=3600)
    async with running(world.mongo, daemon_settings()):
        run = await finished_run(world.mongo, iid)
        assert run["state"] == "completed" and run["attemptsMade"] == 1
    after = await world.doc(iid)
    assert world.cipher.decrypt(after["refreshToken"]) == issued(world.oauth)["refresh_token"]
    assert len(token_requests(world.oauth)) == 1
    assert [r["state"] for r in await refresh_runs(world.mongo, later)] == ["delayed"]


async def test_5xx_is_retried_with_exponential_backoff_then_succeeds(world: World) -> None:
    provider = await world.provider(rotate=True)
    iid, rt = await world.integration(provider)
    world.oauth.script(Fault(500, {"error": "server_error"}), Fault(502, "bad gateway"))
    async with running(world.mongo, daemon_settings()):
        run = await finished_run(world.mongo, iid)
    reqs = token_requests(world.oauth)
    assert [r.status for r in reqs] == [500, 502, 200]
    assert all(r.form["refresh_token"] == rt for r in reqs)
    assert reqs[1].monotonic - reqs[0].monotonic >= 0.1  # delay 0.1, then 0.2
    assert reqs[2].monotonic - reqs[1].monotonic >= 0.2
    assert (run["state"], run["attemptsMade"]) == ("completed", 3)
    assert [a["outcome"] for a in run["attempts"]] == ["retrying", "retrying", "completed"]
    after = await world.doc(iid)
    assert world.cipher.decrypt(after["refreshToken"]) == issued(world.oauth)["refresh_token"]


async def test_429_is_retried_no_sooner_than_retry_after(world: World) -> None:
    provider = await world.provider()
    iid, _ = await world.integration(provider)
    world.oauth.script(Fault(429, {"error": "slow_down"}, {"Retry-After": "1"}))
    async with running(world.mongo, daemon_settings()):
        run = await finished_run(world.mongo, iid)
    first, second = token_requests(world.oauth)
    assert (first.status, second.status) == (429, 200)
    assert second.monotonic - first.monotonic >= 1.0
    assert run["state"] == "completed"


async def test_a_hanging_endpoint_times_out_and_is_retried(world: World) -> None:
    provider = await world.provider(rotate=True)
    iid, rt = await world.integration(provider)
    world.oauth.script(Hang(30))  # never answers in time; does not touch the token
    async with running(world.mongo, daemon_settings(request_timeout=0.3)):
        run = await finished_run(world.mongo, iid)
    assert run["state"] == "completed" and run["attemptsMade"] == 2
    assert "timed out" in run["attempts"][0]["error"]["message"]
    reqs = token_requests(world.oauth)
    assert len(reqs) == 2 and reqs[1].monotonic - reqs[0].monotonic >= 0.3
    assert not world.oauth.is_active(rt)  # rotated by the successful retry


async def test_retries_stop_at_the_token_expiry_and_the_integration_is_marked_expired(
        world: World) -> None:
    provider = await world.provider()
    iid, rt = await world.integration(provider, expires_in=5)
    world.oauth.script(Fault(429, {"error": "slow_down"}, {"Retry-After": "30"}))
    async with running(world.mongo, daemon_settings()) as daemon:
        run = await finished_run(world.mongo, iid)
        assert run["state"] == "failed"
        assert run["error"]["deadlineExceeded"] is True and run["attemptsMade"] == 1

        async def expired() -> bool:
            return (await world.doc(iid))["status"] == "expired"

        await wait_for(expired, message="marked expired")
        assert daemon.jobs["refresh"].refresher is not None
    assert len(token_requests(world.oauth)) == 1
    [note] = await notifications(world.mongo, iid)
    assert note["kind"] == "integration.expired"
    assert "expired before a refresh succeeded" in note["reason"]
    # a transient failure does not condemn the refresh token
    assert "refreshFailure" not in (await integration_state(world.mongo, iid) or {})
    assert world.oauth.is_active(rt)


async def test_exponential_backoff_is_bounded_by_the_token_expiry(world: World) -> None:
    provider = await world.provider()
    iid, _ = await world.integration(provider, expires_in=2.5)
    world.oauth.script(*[Fault(500, "down")] * 5)
    settings = daemon_settings(queue={"attempts": 10, "backoff": {"delay": 1.0, "jitter": 0}})
    async with running(world.mongo, settings):
        run = await finished_run(world.mongo, iid)
        # attempt 1 at once, attempt 2 after 1 s; attempt 3 (2 s later) would pass the expiry
        assert run["state"] == "failed" and run["attemptsMade"] == 2
        assert run["error"]["deadlineExceeded"] is True

        async def expired() -> bool:
            return (await world.doc(iid))["status"] == "expired"

        await wait_for(expired, message="marked expired")
    assert len(token_requests(world.oauth)) == 2


async def test_a_follow_up_run_still_honours_retry_after(world: World) -> None:
    provider = await world.provider()
    iid, _ = await world.integration(provider, expires_in=4)
    world.oauth.script(Fault(429, {"error": "slow_down"}, {"Retry-After": "30"}))
    async with running(world.mongo, daemon_settings(sync_interval=0.2)):

        async def settled() -> bool:  # asked again, or given up as it cannot be saved
            return (len(token_requests(world.oauth)) > 1
                    or (await world.doc(iid))["status"] == "expired")

        await wait_for(settled, timeout=10, message="a second request or the expiry marking")
    reqs = token_requests(world.oauth)
    assert len(reqs) == 1, (
        f"asked again {reqs[1].monotonic - reqs[0].monotonic:.1f}s after a 429 with "
        "Retry-After: 30")
    assert (await world.doc(iid))["status"] == "expired"


@pytest.mark.parametrize(("fault", "wait"), [
    (Fault(429, {"error": "slow_down"}, {"Retry-After": "2"}), 2.0),
    (Fault(503, "down"), 1.5),
], ids=["retry-after", "backoff"])
async def test_discovery_does_not_cut_a_retry_short(world: World, fault: Fault, wait: float,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    provider = await world.provider()
    iid, _ = await world.integration(provider)  # due now
    world.oauth.script(fault)
    # discovery passes every 50 ms (full ones every 10) while the retry waits
    settings = daemon_settings(sync_interval=0.05,
                               queue={"backoff": {"delay": 1.5, "jitter": 0}})
    async with running(world.mongo, settings) as daemon:
        discovery = daemon.jobs["refresh"].discovery
        assert discovery is not None
        passes = DiscoveryPasses(discovery, monkeypatch)
        await wait_for(lambda: len(token_requests(world.oauth)) == 1, message="the 1st attempt")
        await discovery.sync_once(full=True)  # a full pass while the retry waits, at any pace
        run = await finished_run(world.mongo, iid)
    first, second = token_requests(world.oauth)
    assert second.monotonic - first.monotonic >= wait, (
        f"asked again after {second.monotonic - first.monotonic:.2f}s, not {wait}s")
    # discovery did run (full and incremental passes) while the retry waited
    waited = passes.between(first.monotonic, second.monotonic)
    assert any(r.full for r in waited) and sum(not r.full for r in waited) >= 2, waited
    assert run["state"] == "completed" and run["attemptsMade"] == 2


async def test_transient_failures_keep_being_retried_until_the_token_expires(
        world: World) -> None:
    provider = await world.provider()
    iid, _ = await world.integration(provider, expires_in=1.5)
    # another tenant's integration, updated later: discovery's watermark moves past ours
    await world.integration(provider, expires_in=3600, tenant_id=new_hex_id(),
                            updated_at=utcnow() + timedelta(milliseconds=50))
    world.oauth.script(*[Fault(500, "down")] * 3)  # a short outage: 3 failed requests
    # Discovery every 0.2 s: the next full pass comes 10 passes (>= 2 s) after start,
    # after the token has expired.
    async with running(world.mongo, daemon_settings(sync_interval=0.2)):
        expiry = as_utc((await world.doc(iid))["tokenExpiresAt"])

        async def refreshed() -> bool:
            return as_utc((await world.doc(iid))["tokenExpiresAt"]) > expiry

        await wait_for(refreshed, timeout=max(0.0, (expiry - utcnow()).total_seconds()),
                       message="a refresh before the token expired")


async def test_a_permanent_failure_sends_one_request_and_is_not_rescheduled(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    provider = await world.provider()
    iid, rt = await world.integration(provider)
    world.oauth.revoke(rt)
    before = await world.doc(iid)
    async with running(world.mongo, daemon_settings(sync_interval=0.05)) as daemon:
        run = await finished_run(world.mongo, iid)
        assert (run["state"], run["attemptsMade"]) == ("failed", 1)
        assert run["error"]["permanent"] is True
        sync = daemon.jobs["refresh"].discovery
        assert sync is not None
        # discovery keeps running (full and incremental passes) and leaves it alone
        for full in (True, False, True):
            assert (await sync.sync_once(full=full)).added == 0
        passes = DiscoveryPasses(sync, monkeypatch)
        await wait_for(lambda: len(passes) >= 12, message="more discovery passes")
        assert await pending_refresh_runs(world.mongo, iid) == []
        assert len(token_requests(world.oauth)) == 1
        await assert_given_up(world, iid, before, "invalid_grant")

        # the tenant reconnects: a new refresh token, and refreshing works again
        new_rt = world.oauth.issue_refresh_token(CID)
        await update_integration(world.mongo, iid, {
            "refreshToken": world.cipher.encrypt(new_rt),
            "accessToken": world.cipher.encrypt("at-reconnected"),
            "tokenExpiresAt": utcnow() + timedelta(seconds=20), "status": "active"})

        async def refreshed_again() -> bool:
            return len(await refresh_runs(world.mongo, iid, ("completed",))) == 1

        await wait_for(refreshed_again, message="refresh after the reconnect")
    assert [r.form["refresh_token"] for r in token_requests(world.oauth)] == [rt, new_rt]
    after = await world.doc(iid)
    assert after["status"] == "active"
    assert "refreshFailure" not in (await integration_state(world.mongo, iid) or {})


async def test_a_reconnect_during_the_refresh_keeps_the_newer_tokens(world: World) -> None:
    provider = await world.provider(rotate=True)
    iid, _ = await world.integration(provider)
    world.oauth.script(Hang(0.5))  # then Authlib answers (and rotates)
    async with running(world.mongo, daemon_settings()):
        await wait_for(lambda: len(token_requests(world.oauth)) == 1, message="request sent")
        reconnect_rt = world.oauth.issue_refresh_token(CID)
        reconnect = {"refreshToken": world.cipher.encrypt(reconnect_rt),
                     "accessToken": world.cipher.encrypt("at-from-reconnect"),
                     "tokenExpiresAt": utcnow() + timedelta(hours=1),
                     "scopesGranted": ["reconnected"], "status": "active"}
        await update_integration(world.mongo, iid, reconnect)
        run = await finished_run(world.mongo, iid)
    assert token_requests(world.oauth)[0].status == 200  # the refresh itself worked
    assert run["state"] == "completed" and "skipped" in run["result"]
    after = await world.doc(iid)
    for name in ("refreshToken", "accessToken", "scopesGranted", "status"):
        assert after[name] == reconnect[name], name
    assert close_to(after["tokenExpiresAt"], reconnect["tokenExpiresAt"],
                    reconnect["tokenExpiresAt"])
    assert world.cipher.decrypt(after["refreshToken"]) == reconnect_rt


async def test_a_revocation_during_the_refresh_is_not_undone(world: World) -> None:
    provider = await world.provider()
    iid, _ = await world.integration(provider)
    world.oauth.script(Hang(0.5))
    async with running(world.mongo, daemon_settings()):
        await wait_for(lambda: len(token_requests(world.oauth)) == 1, message="request sent")
        await update_integration(world.mongo, iid, {"status": "revoked"})
        before = await world.doc(iid)
        run = await finished_run(world.mongo, iid)
    assert run["state"] == "completed"
    assert await world.doc(iid) == before


async def test_a_revoked_integration_with_a_pending_job_is_never_refreshed(
        world: World) -> None:
    provider = await world.provider()
    iid, _ = await world.integration(provider, expires_in=61.0)  # lead 60: due in ~1 s
    async with running(world.mongo, daemon_settings()):
        await wait_for(lambda: _delayed(world.mongo, iid), message="job scheduled")
        # revoked by the user (or the backend's health check), unnoticed by discovery
        await update_integration(world.mongo, iid, {"status": "revoked"}, touch=False)
        before = await world.doc(iid)
        run = await finished_run(world.mongo, iid)
    assert run["state"] == "completed"
    assert run["result"] == {"skipped": "the integration is revoked"}
    assert token_requests(world.oauth) == []
    assert await world.doc(iid) == before


async def _delayed(mongo: Mongo, iid: str) -> bool:
    return [r["state"] for r in await pending_refresh_runs(mongo, iid)] == ["delayed"]


# -- the cycle: a refresh schedules the next one itself ------------------------------------


async def test_a_refresh_schedules_the_next_one_for_the_new_tokens_without_discovery(
        world: World) -> None:
    provider = await world.provider(rotate=True)  # answers new tokens, valid 3600 s
    iid, _ = await world.integration(provider, expires_in=30)  # lead 60: due at once
    before = await world.doc(iid)
    # sync_interval 3600: discovery passes once, at start (a jitter makes the next
    # refresh's due time this integration's own)
    async with running(world.mongo, daemon_settings(jitter=120)) as daemon:
        discovery = daemon.jobs["refresh"].discovery
        assert discovery is not None
        await wait_for(lambda: discovery.last_sync is not None, message="the first pass")
        first_pass = discovery.last_sync
        run = await finished_run(world.mongo, iid)
        assert run["state"] == "completed" and "skipped" not in run["result"]
        found: list[dict[str, Any]] = []

        async def next_scheduled() -> bool:
            found[:] = await pending_refresh_runs(world.mongo, iid)
            return bool(found)

        await wait_for(next_scheduled, message="the next refresh, scheduled by the cycle")
        assert discovery.last_sync == first_pass  # no other discovery pass meanwhile
    after = await world.doc(iid)
    assert as_utc(after["tokenExpiresAt"]) > as_utc(before["tokenExpiresAt"])
    [follow] = found
    assert follow["state"] == "delayed" and follow["_id"] != run["_id"]
    assert follow["data"]["connection"] == connection_fingerprint(after)
    assert follow["data"]["connection"] != connection_fingerprint(before)
    due = due_time(iid, after["tokenExpiresAt"], daemon.settings.refresh)
    assert abs(as_utc(follow["runAt"]) - due) <= timedelta(seconds=1), (follow["runAt"], due)
    assert len(await refresh_runs(world.mongo, iid, ("completed",))) == 1
    assert len(token_requests(world.oauth)) == 1


# -- per-provider limits ------------------------------------------------------------------------


def max_in_window(times: list[float], window: float) -> int:
    """The most arrivals within any `window` seconds."""
    times = sorted(times)
    best = 0
    for i, start in enumerate(times):
        best = max(best, sum(1 for t in times[i:] if t - start < window))
    return best


async def test_a_burst_for_one_provider_respects_its_concurrency_and_rate(
        world: World) -> None:
    concurrency, rate, burst = 2, 4.0, 8
    busy = await world.provider("busy-provider")
    other = await world.provider("other-provider")
    busy_ids = [(await world.integration(busy))[0] for _ in range(burst)]
    other_ids = [(await world.integration(other))[0] for _ in range(2)]
    # every request to either provider takes 0.6 s at the server
    world.oauth.script(*[Hang(0.6)] * (burst + 2))
    settings = daemon_settings(provider_concurrency=concurrency, provider_rate=rate)
    started = time.monotonic()
    async with running(world.mongo, settings) as daemon:
        for iid in busy_ids + other_ids:
            assert (await finished_run(world.mongo, iid, timeout=20))["state"] == "completed"
        assert daemon.jobs["refresh"].refresher is not None
    reqs = token_requests(world.oauth)
    assert all(r.status == 200 for r in reqs) and len(reqs) == burst + 2
    peaks = meter(world.oauth).peak
    assert peaks["busy-provider"] == concurrency  # reached, never exceeded
    arrivals = [r.monotonic for r in reqs if r.basic_auth and r.basic_auth[0] == "busy-provider"]
    # starts are 1/rate apart: at most `rate` in any second (50 ms of network jitter allowed)
    assert max_in_window(arrivals, 1.0 - 0.05) <= rate
    gaps = [b - a for a, b in zip(sorted(arrivals), sorted(arrivals)[1:], strict=False)]
    assert min(gaps) >= 1 / rate - 0.05
    # the other provider is limited on its own, not queued behind the busy one
    other_arrivals = [r.monotonic for r in reqs
                      if r.basic_auth and r.basic_auth[0] == "other-provider"]
    assert max(other_arrivals) - started < 2.0
    assert max(arrivals) - started >= (burst - 1) / rate - 0.05


# -- a provider's own configuration error: the provider waits, not its tenants ---------------


async def postponed(mongo: Mongo, iid: str) -> bool:
    runs = await pending_refresh_runs(mongo, iid)
    return len(runs) == 1 and runs[0]["state"] == "delayed" and any(
        a.get("outcome") == "postponed" for a in runs[0]["attempts"])


async def hold_alert(world: World, daemon: Daemon) -> list[str]:
    manager = AlertManager(daemon.settings, world.mongo, daemon.registry, channels=[],
                           rules=[Rule("provider_on_hold", provider_on_hold)])
    return [m.text for m in await manager.evaluate()]


async def test_a_wrong_client_secret_holds_the_provider_until_it_is_fixed(
        world: World, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # No re-probe within the test: only the fix of the provider's document resumes it.
    provider = await world.provider(rotate=True, name="Acme Drive")
    ids = [(await world.integration(provider, expires_in=30 + i))[0] for i in range(3)]
    other = await world.provider("other-client")  # another provider is not held
    other_id, _ = await world.integration(other)
    world.oauth.add_client(CID, "rotated-at-the-provider", rotate_refresh_token=True)
    before = {iid: await world.doc(iid) for iid in ids}
    settings = daemon_settings(sync_interval=0.1, provider_concurrency=1,
                               provider_hold_recheck=3600.0)
    with caplog.at_level(logging.INFO):
        async with running(world.mongo, settings) as daemon:
            for iid in ids:
                await wait_for(lambda iid=iid: postponed(world.mongo, iid),
                               message="refresh postponed")
            assert (await finished_run(world.mongo, other_id))["state"] == "completed"
            # not one tenant is touched, told or failed
            for iid in ids:
                assert await world.doc(iid) == before[iid]
                assert await notifications(world.mongo, iid) == []
                [run] = await pending_refresh_runs(world.mongo, iid)
                assert run["attemptsMade"] == 0 and run.get("error") is None
            assert await refresh_runs(world.mongo, None, ("failed",)) == []
            refused = [r for r in token_requests(world.oauth) if r.status == 401]
            assert len(refused) == 1  # the rest saw the hold before their turn came
            errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
            assert [r.getMessage() for r in errors] == [
                "provider put on hold: its token endpoint refuses our configuration of it; "
                "no tenant's status changes and its refreshes wait until the provider is fixed"]
            assert errors[0].__dict__["providerId"] == provider.hex
            assert errors[0].__dict__["error"] == "invalid_client"

            [alert] = await hold_alert(world, daemon)
            assert alert.startswith(f"[mwapjobs] FIRING: provider_on_hold (provider Acme Drive "
                                    f"({provider.hex})): invalid_client: ")
            earliest = min(as_utc(before[i]["tokenExpiresAt"]) for i in ids)
            assert "3 access tokens of this provider expire while it stays on hold, the " \
                   f"earliest at {earliest.isoformat(timespec='seconds')}" in alert
            assert "HTTP 401" in alert

            # the operator puts the new secret into cloudProviders: everything resumes
            await world.mongo.call(lambda db: db[PROVIDERS].update_one(
                {"_id": provider.id},
                {"$set": {"clientSecret": world.cipher.encrypt("rotated-at-the-provider"),
                          "updatedAt": utcnow()}}))
            for iid in ids:
                run = await finished_run(world.mongo, iid)
                assert run["state"] == "completed", run
            # The alert state is shared (mwapjobs_alerts): the next evaluation resolves it.
            assert await hold_alert(world, daemon) == [
                f"[mwapjobs] RESOLVED: provider_on_hold (provider Acme Drive ({provider.hex}))"]
    for iid in ids:
        after = await world.doc(iid)
        assert after["status"] == "active"
        assert as_utc(after["tokenExpiresAt"]) > as_utc(before[iid]["tokenExpiresAt"])
    state = await ProviderHolds(world.mongo).state(provider.hex)
    assert state is not None and "hold" not in state
    assert state["lastHold"]["liftedBecause"] == "the provider's configuration changed"


async def test_a_held_provider_is_probed_again_by_one_refresh_and_resumes(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    provider = await world.provider()
    ids = [(await world.integration(provider))[0] for _ in range(4)]
    world.oauth.add_client(CID, "disabled-for-now")  # the provider side is broken
    holds = ProviderHolds(world.mongo)
    async with running(world.mongo, daemon_settings(provider_hold_recheck=0.4)):

        async def probed_twice() -> bool:
            state = await holds.state(provider.hex)
            return bool(state and (state.get("hold") or {}).get("probes", 0) >= 2)

        await wait_for(probed_twice, message="two re-probes")
        state = await holds.state(provider.hex)
        assert state is not None
        probes = state["hold"]["probes"]
        requests = len(token_requests(world.oauth))
        # the first wave (at most provider_concurrency before the hold is known), then
        # one request per re-probe, claimed by one run
        assert requests <= 4 + probes + 1, (requests, probes)
        for iid in ids:
            assert (await world.doc(iid))["status"] == "active"
        # fixed at the provider, not in our data: the next re-probe finds out
        world.oauth.add_client(CID, SECRET)
        for iid in ids:
            assert (await finished_run(world.mongo, iid))["state"] == "completed"
    state = await holds.state(provider.hex)
    assert state is not None and "hold" not in state
    assert state["lastHold"]["liftedBecause"] == "a refresh got through"
    assert await notifications(world.mongo) == []
