"""Pages of finished runs are looked for in recent windows of the history first
(`RunStore.page`): the answer is the whole history's, in its order, and a page of
recent runs costs one query however much older history there is."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from bson import ObjectId

from mwapjobs.storage.mongo import Mongo
from mwapjobs.storage.names import RUNS
from mwapjobs.storage.runs import HISTORY_WINDOWS, RunStore
from tests.support.mwap_data import insert_all

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
# Ages in seconds: inside the first window, and in each wider one, and beyond them all.
AGES = [5, 30, 60, 200, 299, 1000, 3000, 7000, 50_000, 200_000, 2_000_000, 5_000_000,
        90 * 86400]


def run(age: float | None, state: str = "completed", queue: str = "q") -> dict[str, Any]:
    return {"_id": ObjectId(), "queue": queue, "state": state, "priority": 0,
            "runAt": NOW, "finishedAt": None if age is None else NOW - timedelta(seconds=age),
            "data": {}, "attempts": []}


async def seed(mongo: Mongo, docs: list[dict[str, Any]]) -> None:
    await insert_all(mongo, RUNS, docs)


def newest_first(docs: list[dict[str, Any]]) -> list[ObjectId]:
    """The whole history's order: newest finish first, the later id first on a tie, and
    runs without a finish time last."""
    timed = sorted((d for d in docs if d["finishedAt"] is not None),
                   key=lambda d: (d["finishedAt"], d["_id"]), reverse=True)
    untimed = sorted((d for d in docs if d["finishedAt"] is None), key=lambda d: d["_id"],
                     reverse=True)
    return [d["_id"] for d in timed + untimed]


@pytest.fixture
async def store(mongo: Mongo) -> RunStore:
    runs = RunStore(mongo)
    await runs.ensure_indexes()
    return runs


async def test_every_page_is_the_whole_historys_page(store: RunStore, mongo: Mongo) -> None:
    docs = [run(age) for age in AGES] + [run(30) for _ in range(3)] + [run(None)]
    docs += [run(10, state="failed"), run(10, queue="other")]  # not of this queue and state
    await seed(mongo, docs)
    mine = [d for d in docs if d["queue"] == "q" and d["state"] == "completed"]
    expected = newest_first(mine)
    for limit in (1, 2, 3, 5, 20):
        for skip in range(0, len(expected) + 2):
            page = await store.page("q", "completed", skip, limit, now=NOW)
            assert [d["_id"] for d in page] == expected[skip:skip + limit], (skip, limit)
    # Without a `now`, the whole history at once: the same answer.
    whole = await store.page("q", "completed", 0, 200)
    assert [d["_id"] for d in whole] == expected


async def test_a_page_of_recent_runs_costs_one_query(store: RunStore, mongo: Mongo) -> None:
    recent = [run(i) for i in range(1, 21)]  # all within the first window
    old = [run(HISTORY_WINDOWS[-1] + 3600 + i) for i in range(200)]
    await seed(mongo, recent + old)
    before = mongo.round_trips
    page = await store.page("q", "completed", 0, 20, now=NOW)
    assert mongo.round_trips - before == 1
    assert [d["_id"] for d in page] == newest_first(recent)
    # The next page is older than every window: each window is tried, then the whole.
    before = mongo.round_trips
    page = await store.page("q", "completed", 20, 20, now=NOW)
    assert mongo.round_trips - before == len(HISTORY_WINDOWS) + 1
    assert [d["_id"] for d in page] == newest_first(old)[:20]


async def test_runs_finished_after_now_are_on_the_first_page(store: RunStore,
                                                              mongo: Mongo) -> None:
    """Another instance's clock may run ahead: its runs still come first."""
    ahead, recent = run(-30), run(10)
    await seed(mongo, [recent, ahead])
    page = await store.page("q", "completed", 0, 20, now=NOW)
    assert [d["_id"] for d in page] == [ahead["_id"], recent["_id"]]


async def test_a_page_counts_only_its_own_state(mongo: Mongo) -> None:
    """The total beside a page of history comes from the counters alone (no count of the
    pending runs); a page of delayed runs counts the delayed runs once."""
    from mwapjobs.config import EngineSettings
    from mwapjobs.engine import Engine
    from mwapjobs.operations import Operations
    from mwapjobs.queues import QueueRegistry

    async def handler(_job: Any) -> None:
        return None

    registry = QueueRegistry()
    registry.register("q", handler)
    engine = Engine(mongo, registry, EngineSettings(sweep_interval=3600, leader_lease=600))
    await engine.start()
    try:
        ops = Operations(engine)
        for i in range(3):
            await engine.add("q", {"i": i}, delay=3600)
        now = datetime.now(UTC)  # the engine's clock
        await seed(mongo, [{**run(10), "finishedAt": now - timedelta(seconds=10)}
                           for _ in range(4)])
        await mongo.call(lambda db: db["mwapjobs_queues"].update_one(
            {"_id": "q"}, {"$set": {"counts": {"completed": 4, "failed": 0}}}, upsert=True))
        before = mongo.round_trips
        listed = await ops.list_runs("q", "completed")
        assert (len(listed["items"]), listed["total"]) == (4, 4)
        # The counters, then the first window: it holds all 4, so no wider one is tried.
        assert mongo.round_trips - before == 2
        before = mongo.round_trips
        delayed = await ops.list_runs("q", "delayed")
        assert (len(delayed["items"]), delayed["total"]) == (3, 3)
        assert mongo.round_trips - before == 2  # the page, and one count
    finally:
        await engine.stop(2)


async def test_the_total_ends_the_search_for_a_short_page(store: RunStore, mongo: Mongo) -> None:
    """A queue with fewer finished runs than a page: the counters' total says the first
    window held them all, so no wider one is read."""
    docs = [run(10), run(20)]
    await seed(mongo, docs)
    before = mongo.round_trips
    page = await store.page("q", "completed", 0, 20, now=NOW, total=2)
    assert mongo.round_trips - before == 1
    assert [d["_id"] for d in page] == newest_first(docs)
    before = mongo.round_trips
    page = await store.page("q", "completed", 0, 20, now=NOW)  # no total: every window
    assert mongo.round_trips - before == len(HISTORY_WINDOWS) + 1
    assert [d["_id"] for d in page] == newest_first(docs)
