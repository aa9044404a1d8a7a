"""The day's refresh activity counters (storage/analytics.py `bump_activity`): counts
are added, never replaced, and a flush costs the same two round trips for one tenant or
a thousand (a fleet of one integration per tenant must not pay a write per refresh)."""

from __future__ import annotations

from mwapjobs.storage.analytics import AnalyticsStore
from mwapjobs.storage.mongo import Mongo
from mwapjobs.storage.names import ANALYTICS_ACTIVITY


async def counters(mongo: Mongo) -> dict[str, dict[str, int]]:
    docs = await mongo.call(lambda db: db[ANALYTICS_ACTIVITY].find({}).to_list(None))
    return {d["_id"]: dict(d.get("refresh") or {}) for d in docs}


async def test_counts_are_added_per_tenant_and_day(mongo: Mongo) -> None:
    store = AnalyticsStore(mongo)
    await store.bump_activity({("t1", "2026-12-01"): {"refreshed": 2},
                               ("t2", "2026-12-01"): {"skipped": 1, "refreshed": 0}})
    await store.bump_activity({("t1", "2026-12-01"): {"refreshed": 3, "permanentFailure": 1},
                               ("t1", "2026-12-02"): {"transientFailure": 4}})
    got = await counters(mongo)
    assert set(got) == {"t1|2026-12-01", "t2|2026-12-01", "t1|2026-12-02"}
    assert got["t1|2026-12-01"]["refreshed"] == 5
    assert got["t1|2026-12-01"]["permanentFailure"] == 1
    assert got["t2|2026-12-01"].get("refreshed", 0) == 0 and got["t2|2026-12-01"]["skipped"] == 1
    assert got["t1|2026-12-02"]["transientFailure"] == 4
    rows = await store.activity("2026-12-01")
    assert {r["tenantId"] for r in rows} == {"t1", "t2"}


async def test_a_counter_written_by_someone_else_is_kept(mongo: Mongo) -> None:
    await mongo.call(lambda db: db[ANALYTICS_ACTIVITY].insert_one(
        {"_id": "t1|d", "tenantId": "t1", "day": "d", "refresh": {"refreshed": 7, "other": 2}}))
    await AnalyticsStore(mongo).bump_activity({("t1", "d"): {"skipped": 1}})
    assert (await counters(mongo))["t1|d"] == {"refreshed": 7, "other": 2, "skipped": 1}


async def test_a_flush_costs_two_round_trips_whatever_the_number_of_tenants(
        mongo: Mongo) -> None:
    store = AnalyticsStore(mongo)
    for tenants in (1, 300):
        before = mongo.round_trips
        await store.bump_activity({(f"t{i}", "d"): {"refreshed": 1} for i in range(tenants)})
        assert mongo.round_trips - before == 2
    before = mongo.round_trips
    await store.bump_activity({(f"t{i}", "d"): {"refreshed": 1} for i in range(300)})
    assert mongo.round_trips - before == 2  # every document there already
    got = await counters(mongo)
    assert len(got) == 300 and got["t0|d"]["refreshed"] == 3 and got["t299|d"]["refreshed"] == 2
    before = mongo.round_trips
    await store.bump_activity({("t0", "d"): {"refreshed": 0}})
    assert mongo.round_trips == before  # nothing to add: no query
