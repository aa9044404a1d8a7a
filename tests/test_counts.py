"""Queue counts come from counters kept with each transition: right after every kind of
change, and at a cost that does not depend on how much history there is."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from bson import ObjectId

from mwapjobs.config import EngineSettings
from mwapjobs.engine import Engine, utcnow
from mwapjobs.operations import Operations
from mwapjobs.queues import Job, PermanentError, QueueRegistry, Retention
from mwapjobs.storage.mongo import Mongo
from mwapjobs.storage.names import RUNS
from mwapjobs.storage.runs import STATES
from tests.conftest import TEST_SIGNING_KEY, wait_for
from tests.support.mwap_data import insert_all


@pytest.fixture
async def engine(mongo: Mongo) -> AsyncIterator[Engine]:
    async def handler(job: Job) -> str:
        if job.data.get("fail"):
            raise PermanentError("no")
        return "ok"

    reg = QueueRegistry()
    reg.register("q", handler, concurrency=20, attempts=1)
    e = Engine(mongo, reg, EngineSettings(lease_seconds=2, sweep_interval=0.3,
                                          retention_interval=3600),
               signing_key=TEST_SIGNING_KEY)
    await e.start()
    yield e
    await e.stop(1)


async def actual(mongo: Mongo) -> dict[str, int]:
    counts = {}
    for state in STATES:
        counts[state] = int(await mongo.call(
            lambda db, s=state: db[RUNS].count_documents({"queue": "q", "state": s})))
    return counts


async def actual_completed(mongo: Mongo, n: int) -> bool:
    return (await actual(mongo))["completed"] == n


async def settled(engine: Engine, mongo: Mongo) -> None:
    async def same() -> bool:
        return dict(await engine.counts("q")) == await actual(mongo)

    await wait_for(same, timeout=10, message="the counts to match the runs")


async def test_counts_follow_every_transition(engine: Engine, mongo: Mongo) -> None:
    ops = Operations(engine)
    ok = [(await engine.add("q", {})).run_id for _ in range(30)]
    bad = [(await engine.add("q", {"fail": True})).run_id for _ in range(10)]
    await engine.add("q", {}, delay=3600)

    async def all_done() -> bool:
        counts = await actual(mongo)
        return counts["completed"] == 30 and counts["failed"] == 10

    await wait_for(all_done, timeout=15, message="every run")
    await settled(engine, mongo)
    await ops.retry(bad[0])  # failed -> waiting -> completed? no: it fails again
    await ops.remove(bad[1])
    await ops.remove(ok[0])
    await settled(engine, mongo)
    assert (await ops.clean("q", "completed", older_than=0)) == 29
    await settled(engine, mongo)
    stats = (await ops.stats())["q"]
    assert (stats["completed"], stats["delayed"]) == (0, 1)
    listed = await ops.list_runs("q", "failed", page=1, page_size=5)
    assert listed["total"] == (await actual(mongo))["failed"]


async def test_retention_and_stalls_are_counted(mongo: Mongo) -> None:
    async def handler(job: Job) -> None:
        return None

    reg = QueueRegistry()
    reg.register("q", handler, concurrency=20, keep_completed=Retention(count=5, age=None))
    e = Engine(mongo, reg, EngineSettings(lease_seconds=2, sweep_interval=0.3,
                                          retention_interval=3600, stalled_limit=0),
               signing_key=TEST_SIGNING_KEY)
    now = utcnow()
    await mongo.call(lambda db: db[RUNS].insert_one({  # a dead process's lone run
        "_id": ObjectId(), "queue": "q", "jobId": None, "data": {}, "state": "active",
        "priority": 0, "runAt": now, "attemptsMade": 1, "maxAttempts": 3, "backoff": {},
        "timeout": 30.0, "deadline": None, "createdAt": now, "attempts": [],
        "leaseOwner": "gone:1:1:x", "leaseUntil": now - timedelta(minutes=1)}))
    await e.start()  # the sweep fails it (stalled_limit 0): one failed run
    try:
        for _ in range(12):
            await e.add("q", {})

        async def all_completed() -> bool:
            return (await actual(mongo))["completed"] == 12

        await wait_for(all_completed, message="the 12 runs completed")
        await settled(e, mongo)
        assert await e.apply_retention() == 7
        await settled(e, mongo)
        assert dict(await e.counts("q")) == {"delayed": 0, "waiting": 0, "active": 0,
                                             "completed": 5, "failed": 1}
    finally:
        await e.stop(1)


async def test_stats_cost_the_same_with_any_history(engine: Engine, mongo: Mongo) -> None:
    ops = Operations(engine)

    mine: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("mine",
                                                                             default=None)
    call = mongo.call

    async def counted(op: Any) -> Any:  # only this task's queries, not background ones
        calls = mine.get()
        if calls is not None:
            calls.append(1)
        return await call(op)

    mongo.call = counted  # type: ignore[method-assign]

    async def trips_of_stats() -> int:
        calls: list[int] = []
        mine.set(calls)
        try:
            await ops.stats()
        finally:
            mine.set(None)
        return len(calls)

    small = await trips_of_stats()
    now = utcnow()
    history: list[dict[str, Any]] = [
        {"_id": ObjectId(), "queue": "q", "state": "completed", "finishedAt": now,
         "createdAt": now, "runAt": now, "data": {}, "attempts": []} for _ in range(5000)]
    await insert_all(mongo, RUNS, history)
    engine.count_finished("q", "completed", len(history))  # as the engine counts its own
    assert await trips_of_stats() == small  # no query more, none of them per run
    assert (await ops.stats())["q"]["completed"] == 5000


async def test_a_flush_on_its_way_is_counted_once_by_a_read_meanwhile(
        engine: Engine, mongo: Mongo) -> None:
    """A flush takes its deltas out of memory and writes them: until the write is
    acknowledged they are in neither place. A count read meanwhile must still see them
    (it saw 0 of 5,000 on the wire lane), and once, not twice."""
    for _ in range(5):
        await engine.add("q", {})
    await settled(engine, mongo)
    assert (await engine.counts("q"))["completed"] == 5
    written = engine.runs.bump
    on_the_wire = asyncio.Event()
    acknowledge = asyncio.Event()

    async def slow_bump(deltas: Any) -> None:
        if deltas:  # the counter task flushes nothing too, on its beat
            on_the_wire.set()
            await acknowledge.wait()
        await written(deltas)

    engine.runs.bump = slow_bump  # type: ignore[method-assign]
    for _ in range(3):
        await engine.add("q", {})
    await wait_for(lambda: actual_completed(mongo, 8), message="eight completed runs")
    flush = asyncio.create_task(engine._flush_counts())
    await asyncio.wait_for(on_the_wire.wait(), 5)
    reads = [asyncio.create_task(engine.counts("q")),
             asyncio.create_task(engine.count("q", "completed")),
             asyncio.create_task(engine.all_counts())]
    await asyncio.sleep(0)  # the reads are under way, waiting on the flush
    acknowledge.set()
    await flush
    counts, completed, every = await asyncio.gather(*reads)
    assert counts["completed"] == completed == every["q"]["completed"] == 8


async def test_a_run_waited_for_is_counted_when_the_wait_returns(
        engine: Engine, mongo: Mongo) -> None:
    """The stored state reads `completed` a moment before this instance processed its
    write's answer (and counted it): `wait_settled` returns after that, so a stats call
    made then counts the run (CI once read 4 of 5)."""
    acknowledged = asyncio.Event()
    record = engine._writer._on_written

    async def slow_record(batch: Any, written: Any) -> None:
        await acknowledged.wait()
        await record(batch, written)

    engine._writer._on_written = slow_record
    added = await engine.add("q", {})
    await wait_for(lambda: actual_completed(mongo, 1), message="the stored run completed")
    waiting = asyncio.create_task(engine.wait_settled(added.run_id, 10))
    await wait_for(lambda: bool(engine._waiters), message="the wait to be parked")
    assert not waiting.done()
    acknowledged.set()
    run = await asyncio.wait_for(waiting, 5)
    assert run is not None and run["state"] == "completed"
    assert (await engine.counts("q"))["completed"] == 1
