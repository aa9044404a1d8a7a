"""Analytics (jobs/analytics/) on a real daemon: the daily snapshots from MWAP's data,
a rerun that replaces, storage quota from simulated providers through the refresh on a
401, the day's refresh counts from the engine's events, the API (who sees what),
metrics, and being off."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from bson import ObjectId

from mwapjobs.api.auth import Authenticator
from mwapjobs.daemon import Daemon
from mwapjobs.jobs.analytics.daily import Analytics
from mwapjobs.storage.files import FileIndexStore
from mwapjobs.storage.identity import IdentityStore
from mwapjobs.storage.mongo import Mongo, StoreUnavailable
from mwapjobs.storage.names import (
    ANALYTICS_DAILY,
    INTEGRATION_STATE,
    INTEGRATIONS,
    PROJECTS,
    VIRTUAL_FILES,
)
from tests.conftest import make_settings, wait_for
from tests.support.admin import call, with_admin
from tests.support.jwks import JwksServer
from tests.support.mwap_data import (
    insert_integration,
    insert_provider,
    insert_superadmin,
    insert_tenant,
    test_cipher,
)
from tests.support.quota_providers import QuotaServer
from tests.support.refresh_world import World

DAY = datetime.now(UTC).date().isoformat()
GB = 2**30
MakeDaemon = Callable[..., Any]


@pytest.fixture
async def idp() -> AsyncIterator[JwksServer]:
    async with JwksServer() as server:
        yield server


@pytest.fixture
async def make_daemon(mongo: Mongo, idp: JwksServer) -> AsyncIterator[MakeDaemon]:
    made: list[Daemon] = []
    jwks = idp.cache()

    async def make(refresh: bool = False, **analytics: Any) -> Daemon:
        settings = make_settings(**with_admin(
            auth0_domain="idp.test", auth0_audience=idp.audience,
            refresh={"enabled": refresh, "sync_interval": 3600, "wait_timeout": 10},
            health={"enabled": False}, maintenance={"enabled": False},
            analytics={"quota": False, **analytics}))
        daemon = Daemon(settings, mongo=mongo)
        daemon.auth = Authenticator(settings, IdentityStore(mongo), jwks)
        await daemon.start()
        await daemon.wait_ready()
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        await daemon.stop()
    await jwks.close()


def analytics(daemon: Daemon) -> Analytics:
    handle = daemon.jobs["analytics"]
    assert isinstance(handle, Analytics)
    return handle


async def seed(mongo: Mongo) -> dict[str, str]:
    """Two tenants with projects, members and integrations; files for one; an integration
    whose tenant is gone."""
    cipher = test_cipher()
    acme = await insert_tenant(mongo, "auth0|acme-owner", name="Acme")
    globex = await insert_tenant(mongo, "auth0|globex-owner", name="Globex")
    drive = await insert_provider(mongo, cipher, token_url="https://x.invalid/t",
                                  client_id="c", client_secret="s", name="Google Drive",
                                  slug="google-drive", metadata={"providerType": "google"})
    box = await insert_provider(mongo, cipher, token_url="https://x.invalid/t", client_id="c",
                                client_secret="s", name="Dropbox", slug="dropbox",
                                metadata={"providerType": "dropbox"})
    ids = {"acme": acme, "globex": globex}
    ids["a1"] = await insert_integration(mongo, cipher, provider=drive, tenant_id=acme)
    ids["a2"] = await insert_integration(mongo, cipher, provider=box, tenant_id=acme,
                                         status="expired")
    ids["a3"] = await insert_integration(mongo, cipher, provider=box, tenant_id=acme,
                                         access_token=None, refresh_token=None)
    ids["g1"] = await insert_integration(mongo, cipher, provider=drive, tenant_id=globex,
                                         status="revoked")
    legacy = ObjectId()  # an integration whose _id is an ObjectId, of a tenant that is gone
    await mongo.call(lambda db: db[INTEGRATIONS].insert_one(
        {"_id": legacy, "tenantId": str(ObjectId()), "providerId": drive.hex,
         "status": "active"}))
    await mongo.call(lambda db: db[PROJECTS].insert_many([
        {"_id": "p1", "tenantId": acme, "name": "Photos", "archived": False,
         "members": [{"userId": "u1", "role": "OWNER"}, {"userId": "u2", "role": "MEMBER"}]},
        {"_id": "p2", "tenantId": acme, "name": "Old", "archived": True,
         "members": [{"userId": "u1", "role": "OWNER"}]},
        {"_id": "p3", "tenantId": globex, "name": "Docs", "members": []}]))
    # The file index's summaries, as jobs/files/ writes them (a full pass, then an
    # incremental page); virtualFiles' own documents are not what is counted.
    files = FileIndexStore(mongo)
    await files.save_state("p1", {"state": "synced", "tenantId": acme, "fileCount": 3,
                                  "folderCount": 1, "totalSize": 6000})
    await files.save_state("p1", {"state": "synced"}, inc={"fileCount": 1, "totalSize": 500})
    await files.save_state("p3", {"state": "skipped", "tenantId": globex})
    await mongo.call(lambda db: db[VIRTUAL_FILES].insert_one(
        {"projectId": "p1", "integrationId": ids["a1"], "providerFileId": "f1", "size": 9}))
    await mongo.call(lambda db: db[INTEGRATION_STATE].insert_many([
        {"_id": ids["a1"], "health": {"tenantId": acme, "lastResult": {"outcome": "healthy"}}},
        {"_id": ids["a2"], "health": {"tenantId": acme, "lastResult": {"outcome": "expired"}}}]))
    return ids


async def snapshot_count(mongo: Mongo) -> int:
    return int(await mongo.call(lambda db: db[ANALYTICS_DAILY].count_documents({})))


async def test_snapshots_count_every_tenant_and_a_rerun_replaces(
        make_daemon: MakeDaemon, mongo: Mongo) -> None:
    ids = await seed(mongo)
    daemon = await make_daemon()
    job = analytics(daemon)
    for _ in range(3):  # what the engine's events say about the day's refreshes
        job.activity.on_event("completed", {"queue": "token-refresh", "result": {},
                                            "data": {"tenantId": ids["acme"]}})
    job.activity.on_event("failed", {"queue": "token-refresh", "error": {"permanent": True},
                                     "data": {"tenantId": ids["acme"]}})
    job.activity.on_event("completed", {"queue": "health-check", "data": {}})  # not counted
    report = await job.run()
    assert report["tenants"] == 2 and report["replaced"] == 0 and report["day"] == DAY
    assert report["roundTrips"] < 30  # a dozen aggregations and two writes, not per tenant

    _, body = await call(daemon, "GET", f"/api/v1/analytics?tenantId={ids['acme']}")
    [acme] = body["data"]["days"]
    assert acme["projects"] == {"total": 2, "archived": 1} and acme["members"] == 2
    assert acme["integrations"]["total"] == 3 and acme["integrations"]["connected"] == 2
    assert acme["integrations"]["byStatus"]["expired"] == 1
    assert {(p["provider"], p["total"]) for p in acme["integrations"]["byProvider"]} == {
        ("Google Drive", 1), ("Dropbox", 2)}
    assert acme["refresh"] == {"refreshed": 3, "skipped": 0, "transientFailure": 0,
                               "permanentFailure": 1}
    assert acme["health"]["healthy"] == 1 and acme["health"]["expired"] == 1
    assert acme["files"] == {"files": 4, "bytes": 6500}
    _, body = await call(daemon, "GET", "/api/v1/analytics")
    [platform] = body["data"]["days"]
    assert platform["scope"] == "platform" and platform["tenants"] == 2
    assert platform["integrations"]["total"] == 4  # the gone tenant's is not counted
    assert platform["integrations"]["byStatus"]["revoked"] == 1
    assert platform["projects"]["total"] == 3 and platform["files"] == {"files": 4,
                                                                       "bytes": 6500}

    await insert_integration(mongo, test_cipher(), provider=str(ObjectId()),
                             tenant_id=ids["globex"])
    report = await job.run()  # the same day again: replaced, never doubled
    assert report["replaced"] == 3
    assert await snapshot_count(mongo) == 3
    _, body = await call(daemon, "GET", "/api/v1/analytics")
    assert body["data"]["days"][0]["integrations"]["total"] == 5

    metrics = (await daemon.metrics.exposition()).decode()
    assert "mwapjobs_analytics_tenants 2.0" in metrics
    assert 'mwapjobs_analytics_integrations{status="revoked"} 1.0' in metrics
    assert ids["acme"] not in metrics and "tenantId" not in metrics  # platform totals only


async def test_storage_quota_through_the_limits_and_a_refresh_on_401(
        make_daemon: MakeDaemon, world: World, mongo: Mongo) -> None:
    async with QuotaServer() as quota:
        providers = {kind: await world.provider(f"client-{kind}", metadata=quota.metadata(kind))
                     for kind in ("dropbox", "google", "microsoft")}
        integrations = {kind: (await world.integration(p, expires_in=5 * 3600))[0]
                        for kind, p in providers.items()}
        extra = [(await world.integration(providers["google"], expires_in=5 * 3600))[0]
                 for _ in range(4)]
        tenant = await insert_tenant(mongo, "auth0|quota-owner")
        await mongo.call(lambda db: db[INTEGRATIONS].update_many(
            {}, {"$set": {"tenantId": tenant}}))
        quota.stale.add("at-before")  # every seeded access token needs a refresh
        daemon = await make_daemon(refresh=True, quota=True, quota_provider_concurrency=2,
                                   quota_provider_rate=50.0)
        # Discovery's first pass first: one that read the pending runs before a "refresh
        # now" was added puts that run back to its scheduled time (a race of the refresh
        # job's, not of the quota's), and this test is about the quota.
        discovery = daemon.jobs["refresh"].discovery
        await wait_for(lambda: discovery.last_sync is not None, message="the first pass")
        job = analytics(daemon)
        record, refusals = job.store.record_quota, [1]

        async def refused_once(readings: Any) -> int:  # a store blip at the first write
            if refusals:
                refusals.pop()
                raise StoreUnavailable("MongoDB unreachable: a blip")
            return await record(readings)

        job.store.record_quota = refused_once  # type: ignore[method-assign]
        report = await job.run()
        assert report["quota"]["writeFailures"] == 1 and report["quota"]["unsaved"] == 0
        assert report["quota"]["integrations"] == 7
        assert report["quota"]["byState"] == {"ok": 7}
        assert report["quota"]["refreshed"] == 7  # each went through the refresh, then again
        assert quota.peak_by_tag["google"] <= 2  # the provider's lane limit
        tokens = [token for _, _, token in quota.requests]
        assert tokens.count("at-before") == 7 and len(tokens) == 14
        assert {kind for _, kind, _ in quota.requests} == {"dropbox", "google", "microsoft"}

        _, body = await call(daemon, "GET", f"/api/v1/analytics?tenantId={tenant}")
        [day] = body["data"]["days"]
        assert day["quota"]["readings"] == 7
        assert day["quota"]["used"] == 7 * 3 * GB and day["quota"]["allocated"] == 7 * 15 * GB
        items = {i["integrationId"]: i for i in day["quota"]["items"]}
        assert set(items) == {*integrations.values(), *extra}
        assert all(i["state"] == "ok" for i in items.values())
        assert day["refresh"]["refreshed"] == 7  # counted from the engine's events

        gone = extra.pop()  # deleted since: its old reading is no quota of the day
        await mongo.call(lambda db: db[INTEGRATIONS].delete_one({"_id": gone}))
        report = await analytics(daemon).run()
        assert report["quota"]["byState"] == {"ok": 6} and report["quota"]["refreshed"] == 0
        assert len(quota.requests) == 14 + 6  # the refreshed tokens are good now
        _, body = await call(daemon, "GET", f"/api/v1/analytics?tenantId={tenant}")
        [day] = body["data"]["days"]
        assert day["quota"]["readings"] == 6 and day["quota"]["used"] == 6 * 3 * GB
        assert {i["integrationId"] for i in day["quota"]["items"]} == {
            *integrations.values(), *extra}


async def test_who_sees_what(make_daemon: MakeDaemon, mongo: Mongo, idp: JwksServer) -> None:
    ids = await seed(mongo)
    daemon = await make_daemon()
    await analytics(daemon).run()
    owner = idp.token("auth0|acme-owner")
    status, body = await call(daemon, "GET", f"/api/v1/analytics?tenantId={ids['acme']}",
                              token=owner)
    assert status == 200 and body["data"]["days"][0]["tenantId"] == ids["acme"]
    for path, code in ((f"/api/v1/analytics?tenantId={ids['globex']}", 403),  # not theirs
                       ("/api/v1/analytics", 403)):  # platform totals: admins only
        assert (await call(daemon, "GET", path, token=owner))[0] == code
    assert (await call(daemon, "GET", "/api/v1/analytics", token=None))[0] == 401
    for query, message in (("?from=2026-13-01", "from must be a date"),
                           ("?to=yesterday", "to must be a date"),
                           ("?from=2026-12-02&to=2026-12-01", "from must not be after to"),
                           ("?from=2020-01-01&to=2026-12-01", "at most 366 days"),
                           ("?from=20261201", "from must be a date"),  # ISO, not this form
                           ("?to=2026-W49-2", "to must be a date"),
                           ("?to=2026-12-01%0A", "to must be a date"),
                           ("?from=0001-01-01&to=9999-12-31", "at most 366 days"),
                           ("?tenantId=not-hex", "tenantId must be a 24-hex id")):
        status, body = await call(daemon, "GET", f"/api/v1/analytics{query}")
        assert status == 400 and message in body["error"]["message"], query
    status, body = await call(daemon, "GET", "/api/v1/analytics?to=0001-01-05")  # no overflow
    assert status == 200 and body["data"]["from"] == "0001-01-01"
    status, _ = await call(daemon, "GET", "/api/v1/analytics?from=nope", token=None)
    assert status == 401  # who asks comes first
    await insert_superadmin(mongo, "auth0|staff")
    staff = idp.token("auth0|staff")
    for path in ("/api/v1/analytics", f"/api/v1/analytics?tenantId={ids['globex']}"):
        status, body = await call(daemon, "GET", path, token=staff)
        assert status == 200 and len(body["data"]["days"]) == 1, path
    week = (datetime.now(UTC).date() - timedelta(days=6)).isoformat()
    status, body = await call(daemon, "GET", f"/api/v1/analytics?from={week}&to={DAY}")
    assert status == 200 and [d["day"] for d in body["data"]["days"]] == [DAY]
    status, body = await call(daemon, "POST", "/api/v1/analytics/run?day=2026-11-30")
    assert status == 202 and body["data"]["day"] == "2026-11-30"


async def test_disabled_means_no_queue(make_daemon: MakeDaemon) -> None:
    daemon = await make_daemon(enabled=False)
    assert daemon.jobs["analytics"] is None and "analytics" not in daemon.registry
    status, body = await call(daemon, "POST", "/api/v1/analytics/run")
    assert status == 503 and body["error"]["code"] == "analytics/disabled"
    status, body = await call(daemon, "GET", "/api/v1/analytics")
    assert status == 200 and body["data"]["enabled"] is False and body["data"]["days"] == []
