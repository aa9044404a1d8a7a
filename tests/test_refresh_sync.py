"""Discovery: exactly one `token-refresh` job per refreshable integration.

Most tests drive `RefreshSync.sync_once()` against an engine that is not
started (no workers, no APScheduler), so the run documents it writes can be
inspected as they are; the last ones run the whole daemon to check that
discovery happens at start and keeps happening.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pytest
from bson import ObjectId

from mwapjobs.config import RefreshSettings
from mwapjobs.crypto import MwapCipher
from mwapjobs.engine import Engine
from mwapjobs.jobs.refresh.discovery import FULL_EVERY, RefreshSync
from mwapjobs.jobs.refresh.now import refresh_now
from mwapjobs.jobs.refresh.runs import (
    MANUAL_PRIORITY,
    QUEUE,
    connection_fingerprint,
    fingerprint,
    job_id,
)
from mwapjobs.queues import Job, QueueRegistry
from mwapjobs.storage.integrations import IntegrationStore
from mwapjobs.storage.mongo import Mongo
from mwapjobs.storage.names import RUNS
from tests.conftest import TEST_ENCRYPTION_KEY, make_settings, wait_for
from tests.support.mwap_data import (
    ABSENT,
    as_utc,
    delete_integration,
    get_integration,
    insert_integration,
    insert_integrations,
    integration_doc,
    new_hex_id,
    notifications,
    pending_refresh_runs,
    test_cipher,
    update_integration,
    utcnow,
)
from tests.support.refresh_world import running

LEAD, JITTER = 300.0, 30.0
SLACK = timedelta(seconds=5)  # for "now" computed on either side of a pass


def same_ms(stored: datetime, expected: datetime) -> bool:
    """BSON dates keep milliseconds: equal up to that."""
    return abs(as_utc(stored) - as_utc(expected)) < timedelta(milliseconds=1)


@dataclass
class Harness:
    mongo: Mongo
    engine: Engine
    store: IntegrationStore
    sync: RefreshSync
    cipher: MwapCipher
    settings: RefreshSettings
    provider_id: str
    tenant_id: str

    async def add(self, **options: Any) -> str:
        options.setdefault("provider", self.provider_id)
        options.setdefault("tenant_id", self.tenant_id)
        return await insert_integration(self.mongo, self.cipher, **options)

    async def pending(self) -> dict[str, dict[str, Any]]:
        """jobId → run, asserting there is at most one pending run per job id."""
        runs = await pending_refresh_runs(self.mongo)
        by_job: dict[str, dict[str, Any]] = {}
        for run in runs:
            assert run["jobId"] not in by_job, f"two pending runs for {run['jobId']}"
            by_job[run["jobId"]] = run
        return by_job

    def restart(self) -> RefreshSync:
        """A new discovery loop on the same data, as after a daemon restart."""
        self.sync = RefreshSync(self.engine, self.store, self.settings, utcnow)
        return self.sync


async def _never_called(job: Job) -> None:
    raise AssertionError("the engine is not started in these tests")


@pytest.fixture
async def h(mongo: Mongo) -> AsyncIterator[Harness]:
    registry = QueueRegistry()
    registry.register(QUEUE, _never_called)
    engine = Engine(mongo, registry)
    await engine.runs.ensure_indexes()
    store = IntegrationStore(mongo)
    await store.ensure_indexes()
    settings = RefreshSettings(lead=LEAD, jitter=JITTER, sync_interval=60)
    yield Harness(mongo, engine, store, RefreshSync(engine, store, settings, utcnow),
                  test_cipher(), settings, new_hex_id(), new_hex_id())


def test_support_key_matches_conftest() -> None:
    assert test_cipher().decrypt(MwapCipher(TEST_ENCRYPTION_KEY).encrypt("x")) == "x"


def test_defaults_lead_five_minutes_small_jitter_sweep_every_minute() -> None:
    defaults = RefreshSettings()
    assert (defaults.lead, defaults.sync_interval) == (300.0, 60.0)
    assert 0 < defaults.jitter <= 60


# -- who gets a job, and when ----------------------------------------------------------


async def test_full_pass_schedules_one_job_per_refreshable_integration(h: Harness) -> None:
    now = utcnow()
    later = await h.add(expires_in=3600)
    soon = await h.add(expires_in=60)                  # already inside the lead: due now
    gone = await h.add(expires_in=-600)                # expired already: refreshed at once
    expired_status = await h.add(expires_in=3600, status="expired")
    error_status = await h.add(expires_in=3600, status="error")
    legacy = await h.add(expires_in=3600, integration_id=ObjectId())  # a real ObjectId _id
    # never scheduled
    await h.add(expires_in=3600, status="revoked")
    await h.add(expires_in=3600, refresh_token=None)
    await h.add(expires_in=3600, refresh_token=ABSENT)
    await h.add(expires_in=3600, refresh_token="")   # MWAP stores '' as ''
    await h.add(expires_in=None)                      # no tokenExpiresAt
    await h.add(expires_in=None, tokenExpiresAt=None)
    await h.add(refresh_token=ABSENT, access_token=ABSENT, expires_in=None)  # new, not connected

    report = await h.sync.sync_once()

    assert report.full and report.seen == 13
    assert (report.added, report.moved, report.dropped) == (6, 0, 0)
    pending = await h.pending()
    refreshable = [later, soon, gone, expired_status, error_status, legacy]
    assert set(pending) == {job_id(i) for i in refreshable}
    for iid in refreshable:
        run = pending[job_id(iid)]
        doc = await get_integration(h.mongo, ObjectId(iid) if iid == legacy else iid)
        assert doc is not None
        expires = as_utc(doc["tokenExpiresAt"])
        assert run["data"] == {"integrationId": iid, "tenantId": h.tenant_id,
                               "providerId": h.provider_id,
                               "connection": connection_fingerprint(doc)}
        assert as_utc(run["deadline"]) == expires
        if iid in (soon, gone):
            assert run["state"] == "waiting"
            assert now - SLACK <= as_utc(run["runAt"]) <= utcnow()
        else:
            assert run["state"] == "delayed"
            due = as_utc(run["runAt"])
            assert expires - timedelta(seconds=LEAD + JITTER) <= due
            assert due <= expires - timedelta(seconds=LEAD)


async def test_jitter_spreads_jobs_a_little_and_is_stable_across_restarts(h: Harness) -> None:
    expiry = utcnow() + timedelta(hours=2)
    expiry = expiry.replace(microsecond=expiry.microsecond // 1000 * 1000)  # as stored (ms)
    docs = [integration_doc(h.cipher, provider=h.provider_id, tenant_id=h.tenant_id,
                            refresh_token=f"rt-{i}", token_expires_at=expiry)
            for i in range(200)]
    await insert_integrations(h.mongo, docs)
    await h.sync.sync_once()
    first = {jid: as_utc(run["runAt"]) for jid, run in (await h.pending()).items()}
    assert len(first) == 200
    # A run's time is stored in milliseconds too: up to 1 ms below the exact bound.
    low = expiry - timedelta(seconds=LEAD + JITTER, milliseconds=1)
    high = expiry - timedelta(seconds=LEAD)
    assert all(low <= due <= high for due in first.values()), sorted(first.values())[:3]
    assert len(set(first.values())) > 150  # spread, not one instant

    report = await h.restart().sync_once()  # a restarted daemon computes the same times
    assert (report.added, report.moved, report.dropped) == (0, 0, 0)
    assert {jid: as_utc(run["runAt"]) for jid, run in (await h.pending()).items()} == first


async def test_a_pass_with_nothing_changed_adds_moves_and_drops_nothing(h: Harness) -> None:
    for i in range(5):
        await h.add(expires_in=3600 + i, refresh_token=f"rt-{i}")
    await h.add(expires_in=-30)  # waiting
    await h.sync.sync_once()
    before = await h.pending()
    for full in (False, True, None):
        report = await h.sync.sync_once(full=full)
        assert (report.added, report.moved, report.dropped) == (0, 0, 0), full
    after = await h.pending()
    assert {j: (r["_id"], r["runAt"], r["state"]) for j, r in after.items()} == {
        j: (r["_id"], r["runAt"], r["state"]) for j, r in before.items()}


# -- changes made by the backend -------------------------------------------------------------


async def test_reconnect_moves_the_job_instead_of_adding_one(h: Harness) -> None:
    iid = await h.add(expires_in=3600, refresh_token="rt-old")
    await h.sync.sync_once()
    [run] = (await h.pending()).values()

    new_expiry = utcnow() + timedelta(hours=3)
    await update_integration(h.mongo, iid, {"tokenExpiresAt": new_expiry,
                                            "refreshToken": h.cipher.encrypt("rt-new"),
                                            "accessToken": h.cipher.encrypt("at-new")})
    report = await h.sync.sync_once(full=False)

    assert (report.full, report.added, report.moved, report.dropped) == (False, 0, 1, 0)
    [moved] = (await h.pending()).values()
    assert moved["_id"] == run["_id"]
    due = as_utc(moved["runAt"])
    assert new_expiry - timedelta(seconds=LEAD + JITTER) <= due <= new_expiry - timedelta(
        seconds=LEAD)
    assert same_ms(moved["deadline"], new_expiry)

    # a reconnect with a token that expires sooner than the lead: due at once
    await update_integration(h.mongo, iid, {"tokenExpiresAt": utcnow() + timedelta(seconds=30)})
    report = await h.sync.sync_once(full=False)
    assert report.moved == 1
    [moved] = (await h.pending()).values()
    assert moved["_id"] == run["_id"] and moved["state"] == "waiting"


async def test_new_integration_is_picked_up_by_an_incremental_pass(h: Harness) -> None:
    await h.add(expires_in=3600)
    await h.sync.sync_once()
    iid = await h.add(expires_in=7200)
    report = await h.sync.sync_once(full=False)
    assert (report.full, report.added) == (False, 1)
    assert job_id(iid) in await h.pending()


async def test_revoked_or_disconnected_integrations_lose_their_job(h: Harness) -> None:
    revoked = await h.add(expires_in=3600)
    unset = await h.add(expires_in=3600)
    nulled = await h.add(expires_in=3600)
    kept = await h.add(expires_in=3600)
    await h.sync.sync_once()
    assert len(await h.pending()) == 4

    await update_integration(h.mongo, revoked, {"status": "revoked"})
    await update_integration(h.mongo, unset, {}, unset=["refreshToken"])
    await update_integration(h.mongo, nulled, {"refreshToken": None})  # Dropbox test endpoint
    report = await h.sync.sync_once(full=False)

    assert (report.added, report.moved, report.dropped) == (0, 0, 3)
    assert set(await h.pending()) == {job_id(kept)}


async def test_deleted_integration_loses_its_job_by_the_next_full_pass(h: Harness) -> None:
    doomed = await h.add(expires_in=3600)
    kept = await h.add(expires_in=3600)
    await h.sync.sync_once()
    await delete_integration(h.mongo, doomed)
    dropped = 0
    for _ in range(FULL_EVERY):  # a full pass comes at least every FULL_EVERY passes
        dropped += (await h.sync.sync_once()).dropped
    assert dropped == 1
    assert set(await h.pending()) == {job_id(kept)}


async def test_a_revocation_that_does_not_touch_updated_at_is_caught_by_a_full_pass(
        h: Harness) -> None:
    iid = await h.add(expires_in=3600)
    await h.sync.sync_once()
    await update_integration(h.mongo, iid, {"status": "revoked"}, touch=False)
    assert (await h.sync.sync_once(full=True)).dropped == 1
    assert await h.pending() == {}


async def test_a_running_refresh_is_neither_moved_nor_duplicated(h: Harness) -> None:
    iid = await h.add(expires_in=30)
    await h.sync.sync_once()
    await h.mongo.call(lambda db: db[RUNS].update_one({"jobId": job_id(iid)},
                                                      {"$set": {"state": "active"}}))
    await update_integration(h.mongo, iid, {"tokenExpiresAt": utcnow() + timedelta(hours=1)})
    for full in (False, True):
        report = await h.sync.sync_once(full=full)
        assert (report.added, report.moved, report.dropped) == (0, 0, 0)
    [run] = (await h.pending()).values()
    assert run["state"] == "active"


async def test_dead_refresh_token_is_not_rescheduled_until_the_tenant_reconnects(
        h: Harness) -> None:
    iid = await h.add(expires_in=60, refresh_token="rt-dead")
    doc = await get_integration(h.mongo, iid)
    assert doc is not None
    # what a permanent failure leaves behind (test_refresh_daemon has the real thing)
    await h.store.record_refresh_failure(iid, fingerprint(doc["refreshToken"]),
                                         "provider refused the refresh (invalid_grant)", utcnow())
    await update_integration(h.mongo, iid, {"status": "expired"})

    for full in (True, False, True):
        report = await h.sync.sync_once(full=full)
        assert report.added == 0
    # the backend touches the document without reconnecting: still nothing
    await update_integration(h.mongo, iid, {"metadata": {"note": "edited"}})
    assert (await h.sync.sync_once(full=False)).added == 0
    assert await h.pending() == {}

    # the tenant reconnects: new refresh token, new expiry, active again
    await update_integration(h.mongo, iid, {
        "refreshToken": h.cipher.encrypt("rt-fresh"), "accessToken": h.cipher.encrypt("at"),
        "tokenExpiresAt": utcnow() + timedelta(hours=1), "status": "active"})
    report = await h.sync.sync_once(full=False)
    assert report.added == 1
    assert set(await h.pending()) == {job_id(iid)}


# -- what belongs to the engine: discovery never undoes a scheduling decision ------------------


async def _set_run(h: Harness, iid: str, fields: dict[str, Any]) -> None:
    """Change a pending run the way the engine does (a retry, a postponement)."""
    await h.mongo.call(lambda db: db[RUNS].update_one({"jobId": job_id(iid)}, {"$set": fields}))


@pytest.mark.parametrize("case", ["backoff", "retry-after", "postponed"])
async def test_a_retry_or_postponement_keeps_its_time(h: Harness, case: str) -> None:
    iid = await h.add(expires_in=30)  # due now
    await h.sync.sync_once()
    # The engine put the run back: a backoff, a provider's Retry-After far beyond the
    # discovery interval, a hold of its provider. Its tokens did not change.
    later = utcnow() + timedelta(seconds={"backoff": 0.5, "retry-after": 120,
                                          "postponed": 600}[case])
    await _set_run(h, iid, {"state": "delayed", "runAt": later, "attemptsMade": 1})
    await update_integration(h.mongo, iid, {"status": "error"})  # touched, tokens unchanged
    for full in (False, True, None):
        report = await h.sync.sync_once(full=full)
        assert (report.added, report.moved, report.dropped) == (0, 0, 0), full
    [run] = (await h.pending()).values()
    assert run["state"] == "delayed" and same_ms(run["runAt"], later)


@pytest.mark.parametrize("source", ["api", "health"])
async def test_a_queued_manual_or_health_refresh_is_not_sent_back(h: Harness,
                                                                  source: str) -> None:
    iid = await h.add(expires_in=7200)
    await h.sync.sync_once()
    doc = await get_integration(h.mongo, iid)
    assert doc is not None
    # What the manual endpoint (data without `connection`) and a health check add.
    data = ({"integrationId": iid, "tenantId": h.tenant_id} if source == "api"
            else {"integrationId": iid, "tenantId": h.tenant_id, "providerId": h.provider_id,
                  "connection": connection_fingerprint(doc)})
    added = await h.engine.add(QUEUE, data, job_id=job_id(iid), priority=MANUAL_PRIORITY,
                               replace=True, deadline=as_utc(doc["tokenExpiresAt"]))
    assert added.state == "waiting"
    for full in (False, True, False):
        await update_integration(h.mongo, iid, {"metadata": {"touched": True}})
        report = await h.sync.sync_once(full=full)
        assert (report.added, report.moved, report.dropped) == (0, 0, 0), full
    [run] = (await h.pending()).values()
    assert (run["state"], run["priority"]) == ("waiting", MANUAL_PRIORITY)
    assert str(run["_id"]) == added.run_id

    # a reconnect while it waits: now the tokens changed, and the job moves to them
    new_expiry = utcnow() + timedelta(hours=3)
    await update_integration(h.mongo, iid, {"refreshToken": h.cipher.encrypt("rt-reconnected"),
                                            "tokenExpiresAt": new_expiry})
    assert (await h.sync.sync_once(full=False)).moved == 1
    [run] = (await h.pending()).values()
    assert run["state"] == "delayed" and same_ms(run["deadline"], new_expiry)
    fresh = await get_integration(h.mongo, iid)
    assert fresh is not None and run["data"]["connection"] == connection_fingerprint(fresh)


async def test_a_manual_refresh_added_during_a_pass_is_not_sent_back(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pass read the pending runs before the manual refresh was added (a new
    integration, refreshed by its owner at once): its "add" must not replace that run."""
    iid = await h.add(expires_in=7200)
    doc = await get_integration(h.mongo, iid)
    assert doc is not None
    read_pending = h.engine.runs.pending_by_job

    async def read_then_manual(queue: str, job_ids: Any = None) -> Any:
        seen = await read_pending(queue, job_ids)  # nothing pending yet
        await refresh_now(h.engine, doc, utcnow())  # the owner's call lands meanwhile
        return seen

    monkeypatch.setattr(h.engine.runs, "pending_by_job", read_then_manual)
    await h.sync.sync_once(full=True)
    [run] = (await h.pending()).values()
    assert (run["state"], run["priority"]) == ("waiting", MANUAL_PRIORITY)


async def test_a_reconnect_does_not_move_a_manual_refresh_added_after_the_read(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tenant reconnected (a move is due) and refreshed by hand while the pass ran:
    the run the pass read was replaced by the manual one, due now, which it leaves."""
    iid = await h.add(expires_in=7200, refresh_token="rt-old")
    await h.sync.sync_once()
    await update_integration(h.mongo, iid, {"refreshToken": h.cipher.encrypt("rt-new"),
                                            "tokenExpiresAt": utcnow() + timedelta(hours=3)})
    doc = await get_integration(h.mongo, iid)
    assert doc is not None
    read_pending = h.engine.runs.pending_by_job

    async def read_then_manual(queue: str, job_ids: Any = None) -> Any:
        seen = await read_pending(queue, job_ids)  # the delayed run, before the reconnect
        await refresh_now(h.engine, doc, utcnow())
        return seen

    monkeypatch.setattr(h.engine.runs, "pending_by_job", read_then_manual)
    report = await h.sync.sync_once(full=False)
    [run] = (await h.pending()).values()
    assert (run["state"], run["priority"]) == ("waiting", MANUAL_PRIORITY)
    assert report.moved == 0


async def test_a_full_pass_keeps_the_run_of_an_integration_created_while_it_read(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """An integration created (and refreshed by its owner at once) after the pass read
    the integrations is not one that "no longer exists": its run is not dropped."""
    read_docs = h.store.changed_since
    created: list[str] = []

    async def read_then_create(since: Any) -> Any:
        docs = await read_docs(since)  # without the new one
        iid = await h.add(expires_in=7200)
        doc = await get_integration(h.mongo, iid)
        assert doc is not None
        await refresh_now(h.engine, doc, utcnow())
        created.append(iid)
        return docs

    monkeypatch.setattr(h.store, "changed_since", read_then_create)
    report = await h.sync.sync_once(full=True)
    [run] = (await h.pending()).values()
    assert run["jobId"] == job_id(created[0]) and run["priority"] == MANUAL_PRIORITY
    assert report.dropped == 0


# -- a dead access token without a refresh token is not left active -------------------------


async def test_an_expired_token_without_refresh_token_is_marked_expired(h: Harness) -> None:
    dead = await h.add(expires_in=-10, refresh_token=None)
    dead_error = await h.add(expires_in=-10, refresh_token=ABSENT, status="error")
    dead_empty = await h.add(expires_in=-10, refresh_token="", encrypt=False)
    alive = await h.add(expires_in=3600, refresh_token=None)           # not expired yet
    unconnected = await h.add(expires_in=-10, refresh_token=None, access_token=None)
    revoked = await h.add(expires_in=-10, refresh_token=None, status="revoked")
    before = {i: await get_integration(h.mongo, i) for i in (alive, unconnected, revoked)}

    report = await h.sync.sync_once()

    assert report.expired == 3
    for iid in (dead, dead_error, dead_empty):
        doc = await get_integration(h.mongo, iid)
        assert doc is not None and doc["status"] == "expired", iid
        [note] = await notifications(h.mongo, iid)
        assert note["kind"] == "integration.expired" and "reconnect" in note["reason"]
    for iid, doc in before.items():
        assert await get_integration(h.mongo, iid) == doc, iid
        assert await notifications(h.mongo, iid) == []
    assert await h.pending() == {}
    for full in (True, False):  # said once
        assert (await h.sync.sync_once(full=full)).expired == 0
    assert len(await notifications(h.mongo)) == 3


async def test_a_reconnect_meanwhile_is_not_marked_expired(h: Harness) -> None:
    iid = await h.add(expires_in=-10, refresh_token=None)
    real_get = h.store.get

    async def reconnected_first(integration_id: str) -> dict[str, Any] | None:
        await update_integration(h.mongo, iid, {
            "refreshToken": h.cipher.encrypt("rt-new"), "accessToken": h.cipher.encrypt("at"),
            "tokenExpiresAt": utcnow() + timedelta(hours=1)})
        return await real_get(integration_id)

    h.store.get = reconnected_first  # type: ignore[method-assign]
    assert (await h.sync.sync_once()).expired == 0
    doc = await get_integration(h.mongo, iid)
    assert doc is not None and doc["status"] == "active"
    assert await notifications(h.mongo, iid) == []


# -- cost: a handful of queries per pass, not one per integration ------------------------------


async def test_round_trips_per_pass_do_not_grow_with_the_number_of_integrations(
        h: Harness) -> None:
    n = 2000
    now = utcnow()
    docs = [integration_doc(h.cipher, provider=h.provider_id, tenant_id=new_hex_id(),
                            refresh_token=f"rt-{i}", expires_in=3600 + i,
                            updated_at=now - timedelta(seconds=n - i), now=now)
            for i in range(n)]
    await insert_integrations(h.mongo, docs)

    async def sync_pass(full: bool | None) -> tuple[Any, int]:
        before = h.mongo.round_trips
        report = await h.sync.sync_once(full=full)
        return report, h.mongo.round_trips - before

    first, trips = await sync_pass(None)
    assert (first.full, first.added) == (True, n)
    # 4 reads for the pass (integrations, our notes, pending runs, provider holds), 2 more
    # on a full pass to watch the providers' URLs (and one write to remember them the
    # first time), plus the write of each new run (one insert each)
    assert trips <= 8 + n

    for full in (True, False, None):
        report, trips = await sync_pass(full)
        assert (report.added, report.moved, report.dropped) == (0, 0, 0)
        assert trips <= 7, f"a pass over {n} unchanged integrations cost {trips} round trips"

    # a few reconnects: the pass reads only those, and writes one move each
    changed = [d["_id"] for d in docs[:10]]
    for iid in changed:
        await update_integration(h.mongo, iid,
                                 {"tokenExpiresAt": utcnow() + timedelta(hours=5)})
    report, trips = await sync_pass(False)
    assert report.moved == len(changed)
    assert report.seen <= len(changed) + 1  # `$gte` the watermark re-reads its own document
    assert trips <= 5 + 3 * len(changed)
    report, trips = await sync_pass(False)
    assert (report.added, report.moved, report.dropped) == (0, 0, 0) and trips <= 5
    assert len(await h.pending()) == n


# -- the daemon runs discovery at start and keeps running it ----------------------------------


async def _pending_run(mongo: Mongo, iid: str) -> dict[str, Any] | None:
    runs = await pending_refresh_runs(mongo, iid)
    assert len(runs) <= 1, runs
    return runs[0] if runs else None


async def test_the_daemon_discovers_at_start_and_continuously(mongo: Mongo) -> None:
    cipher = test_cipher()
    provider, tenant = new_hex_id(), new_hex_id()

    async def add(**options: Any) -> str:
        return await insert_integration(mongo, cipher, provider=provider, tenant_id=tenant,
                                        **options)

    first = await add(expires_in=3600)
    second = await add(expires_in=3600)
    settings = make_settings(refresh={"lead": LEAD, "jitter": JITTER, "sync_interval": 0.1})
    async with running(mongo, settings):
        await wait_for(lambda: _has_runs(mongo, [first, second]), message="jobs at start")

        third = await add(expires_in=5400)
        await wait_for(lambda: _has_runs(mongo, [third]), message="a new integration's job")

        run = await _pending_run(mongo, first)
        assert run is not None
        new_expiry = utcnow() + timedelta(hours=4)
        await update_integration(mongo, first, {"tokenExpiresAt": new_expiry})

        async def moved() -> bool:
            now_run = await _pending_run(mongo, first)
            return now_run is not None and as_utc(now_run["runAt"]) > new_expiry - timedelta(
                seconds=LEAD + JITTER + 1)

        await wait_for(moved, message="the job moved after a reconnect")
        assert (await _pending_run(mongo, first) or {}).get("_id") == run["_id"]

        await update_integration(mongo, second, {"status": "revoked"})
        await wait_for(lambda: _no_run(mongo, second), message="revoked integration's job gone")
        await delete_integration(mongo, third)
        await wait_for(lambda: _no_run(mongo, third), timeout=FULL_EVERY * 0.1 + 10,
                       message="deleted integration's job gone")
        assert await _pending_run(mongo, first) is not None
        started = await mongo.call(lambda db: db["mwapjobs_runs"].count_documents(
            {"queue": QUEUE, "attemptsMade": {"$gt": 0}}))
        assert started == 0  # nothing was due: discovery only scheduled


async def test_the_daemon_expires_dead_tokens_without_health_checks(mongo: Mongo) -> None:
    cipher = test_cipher()
    iid = await insert_integration(mongo, cipher, provider=new_hex_id(), tenant_id=new_hex_id(),
                                   refresh_token=None, expires_in=-5)
    settings = make_settings(health={"enabled": False},
                             refresh={"lead": LEAD, "jitter": JITTER, "sync_interval": 0.1})
    async with running(mongo, settings) as daemon:
        assert daemon.jobs["health"] is None

        async def expired_and_told() -> bool:  # the status is written, then the notification
            doc = await get_integration(mongo, iid)
            return (doc is not None and doc["status"] == "expired"
                    and bool(await notifications(mongo, iid)))

        await wait_for(expired_and_told, message="the dead integration marked expired")
        [note] = await notifications(mongo, iid)
        assert note["kind"] == "integration.expired"


async def _has_runs(mongo: Mongo, ids: list[str]) -> bool:
    return all([await _pending_run(mongo, i) is not None for i in ids])


async def _no_run(mongo: Mongo, iid: str) -> bool:
    return await _pending_run(mongo, iid) is None
