"""The queue engine's pause and resume (also across a restart) and the retention of
finished runs by count and age."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from bson import ObjectId

from mwapjobs.engine import Engine
from mwapjobs.operations import Operations
from mwapjobs.queues import Job, PermanentError, Retention
from mwapjobs.storage.mongo import Mongo
from mwapjobs.storage.names import RUNS
from tests.conftest import wait_for
from tests.support import engines
from tests.support.engines import FakeClock, MakeEngine, all_runs, doc, registry, wait_state

# This module's fixture (tests/support/engines.py).
make_engine = engines.make_engine


# -- pause / resume ----------------------------------------------------------------------------


async def test_paused_queue_starts_nothing_until_resumed(make_engine: MakeEngine) -> None:
    ran: list[str] = []

    async def handler(job: Job) -> None:
        ran.append(job.queue)

    reg = registry(handler)
    reg.register("other", handler)
    engine = await make_engine(reg, sweep_interval=0.2)
    ops = Operations(engine)
    claims: list[str] = []
    claim = engine.runs.claim

    async def counting_claim(queue: str, *args: Any) -> list[dict[str, Any]]:
        claims.append(queue)
        return await claim(queue, *args)

    engine.runs.claim = counting_claim  # type: ignore[method-assign]

    await ops.pause("q")
    paused_at = len(claims)
    ids = [(await engine.add("q", {"i": i})).run_id for i in range(2)]
    other = await engine.add("other", {})
    await wait_state(engine, other.run_id, "completed")
    engine.wake("q")
    # Several worker cycles pass (the other queue's worker claims on the same cadence).
    mark = len(claims)
    await wait_for(lambda: claims[mark:].count("other") >= 3, timeout=5,
                   message="worker cycles")
    assert "q" not in claims[paused_at:]
    assert ran == ["other"]
    for run_id in ids:
        assert (await doc(engine, run_id))["state"] == "waiting"
    stats = await ops.stats()
    assert stats["q"]["paused"] == 2
    assert stats["q"]["waiting"] == 0
    assert stats["q"]["isPaused"] is True
    assert stats["other"]["isPaused"] is False

    await ops.resume("q")
    for run_id in ids:
        await wait_state(engine, run_id, "completed")
    assert "q" in claims[paused_at:]
    assert sorted(ran) == ["other", "q", "q"]
    stats = await ops.stats()
    assert stats["q"]["paused"] == 0
    assert stats["q"]["completed"] == 2
    assert stats["q"]["isPaused"] is False


async def test_pause_survives_a_restart(make_engine: MakeEngine) -> None:
    ran: list[str] = []

    async def handler(job: Job) -> None:
        ran.append(job.run_id)

    a = await make_engine(registry(handler))
    await Operations(a).pause("q")
    await a.stop(1)

    b = await make_engine(registry(handler), start=False)
    added = await b.add("q", {})  # written before start; waits for the resume
    await b.start()
    assert b.is_paused("q")
    assert (await Operations(b).stats())["q"]["paused"] == 1
    assert (await doc(b, added.run_id))["state"] == "waiting"
    assert ran == []

    await Operations(b).resume("q")
    await wait_state(b, added.run_id, "completed")
    assert ran == [added.run_id]
    await b.stop(1)

    c = await make_engine(registry(handler))
    assert not c.is_paused("q")


# -- retention ------------------------------------------------------------------------------


async def finish_one(engine: Engine, data: dict[str, Any], state: str = "completed") -> str:
    added = await engine.add("q", data)
    await wait_state(engine, added.run_id, state)
    return added.run_id



async def test_retention_keeps_the_newest_completed(make_engine: MakeEngine,
                                                    mongo: Mongo) -> None:
    clock = FakeClock()

    async def handler(job: Job) -> None:
        if job.data.get("fail"):
            raise PermanentError("no")

    engine = await make_engine(
        registry(handler, keep_completed=Retention(count=2, age=None),
                 keep_failed=Retention(count=None, age=None)),
        clock=clock,
    )
    ids = []
    for i in range(4):
        ids.append(await finish_one(engine, {"i": i}))
        clock.advance(1)
    failed = [await finish_one(engine, {"fail": True}, "failed") for _ in range(3)]

    assert await engine.apply_retention() == 2
    remaining = {str(r["_id"]) for r in await all_runs(mongo, {"state": "completed"})}
    assert remaining == set(ids[2:])
    assert {str(r["_id"]) for r in await all_runs(mongo, {"state": "failed"})} == set(failed)
    assert await engine.apply_retention() == 0


async def test_retention_by_count_deletes_the_oldest_and_keeps_the_newest(
    make_engine: MakeEngine, mongo: Mongo
) -> None:
    """What holds with or without the off-by-one above: the newest `count` stay, and runs
    well beyond the limit go."""
    clock = FakeClock()

    async def handler(job: Job) -> None:
        return None

    engine = await make_engine(
        registry(handler, keep_completed=Retention(count=2, age=None)), clock=clock
    )
    ids = []
    for i in range(5):
        ids.append(await finish_one(engine, {"i": i}))
        clock.advance(1)
    deleted = await engine.apply_retention()
    remaining = {str(r["_id"]) for r in await all_runs(mongo)}
    assert set(ids[3:]) <= remaining
    assert not {ids[0], ids[1]} & remaining
    assert deleted == 5 - len(remaining)


async def test_retention_removes_old_runs_by_age(make_engine: MakeEngine, mongo: Mongo) -> None:
    clock = FakeClock()

    async def handler(job: Job) -> None:
        if job.data.get("fail"):
            raise PermanentError("no")

    engine = await make_engine(
        registry(handler, keep_completed=Retention(count=None, age=3600),
                 keep_failed=Retention(count=None, age=7200)),
        clock=clock,
    )
    old = [await finish_one(engine, {"i": i}) for i in range(2)]
    old_failed = await finish_one(engine, {"fail": True}, "failed")
    clock.advance(5400)  # 1.5 h later: past the completed limit, within the failed one
    fresh = await finish_one(engine, {"i": 9})

    assert await engine.apply_retention() == 2
    assert {str(r["_id"]) for r in await all_runs(mongo, {"state": "completed"})} == {fresh}
    assert [str(r["_id"]) for r in await all_runs(mongo, {"state": "failed"})] == [old_failed]
    for run_id in old:
        assert await engine.runs.get(ObjectId(run_id)) is None

    clock.advance(3700)  # now the failed run is over 2.5 h old, the "fresh" one over 1 h
    assert await engine.apply_retention() == 2  # the failed one and the "fresh" completed one
    assert await all_runs(mongo) == []


async def test_retention_count_with_tied_finish_times(make_engine: MakeEngine,
                                                      mongo: Mongo) -> None:
    async def handler(job: Job) -> None:
        return None

    engine = await make_engine(
        registry(handler, keep_completed=Retention(count=2, age=None)), start=False
    )
    t = datetime(2026, 1, 1, tzinfo=UTC)
    finished = [t, t, t + timedelta(seconds=1)]  # the 2nd and 3rd newest finished together
    docs = [{"_id": ObjectId(), "queue": "q", "state": "completed", "finishedAt": f,
             "data": {}} for f in finished]
    await mongo.call(lambda db: db[RUNS].insert_many(docs))
    await engine.apply_retention()
    assert len(await all_runs(mongo, {"state": "completed"})) == 2
