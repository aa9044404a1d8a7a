"""Outcomes survive an outage, pause means pause, and renewals do not cry wolf."""

from __future__ import annotations

import asyncio
import logging

import pytest
from bson import ObjectId

from mwapjobs.config import EngineSettings
from mwapjobs.engine import Engine
from mwapjobs.queues import Job, QueueRegistry
from mwapjobs.storage.mongo import Mongo
from tests.conftest import wait_for
from tests.support.flaky import flaky


async def test_an_outcome_lost_in_an_outage_is_written_later_not_redone(mongo: Mongo) -> None:
    db = flaky(mongo)
    calls: list[str] = []
    finishing = asyncio.Event()
    go = asyncio.Event()

    async def handler(job: Job) -> str:
        calls.append(job.run_id)
        finishing.set()
        await go.wait()
        return "done"

    reg = QueueRegistry()
    reg.register("q", handler)
    engine = Engine(db, reg, EngineSettings(lease_seconds=1.5, sweep_interval=0.2))
    await engine.start()
    try:
        added = await engine.add("q", {})
        await asyncio.wait_for(finishing.wait(), 10)
        db.down = True
        go.set()  # the handler returns while MongoDB is away: the write fails, and again
        await wait_for(lambda: db.attempts >= 10, timeout=10, message="failing writes")
        await asyncio.sleep(3 * 1.5)  # the outage under test: longer than the lease
        db.down = False

        async def completed() -> bool:
            run = await engine.runs.get(ObjectId(added.run_id))
            return run is not None and run["state"] == "completed"

        await wait_for(completed, timeout=10, message="the outcome written after the outage")
        await engine.sweep()
        assert calls == [added.run_id]  # run once: its lease was kept, nobody redid it
        run = await engine.runs.get(ObjectId(added.run_id))
        assert run is not None and run["result"] == "done"
        assert [a["outcome"] for a in run["attempts"]] == ["completed"]
    finally:
        await engine.stop(1)


async def test_no_run_starts_after_pause_returns(mongo: Mongo) -> None:
    started: list[tuple[str, bool]] = []
    paused = False

    async def handler(job: Job) -> None:
        started.append((job.run_id, paused))

    reg = QueueRegistry()
    reg.register("q", handler, concurrency=20)
    engine = Engine(mongo, reg, EngineSettings(lease_seconds=2, sweep_interval=0.05,
                                               claim_batch=3))
    await engine.start()
    try:
        for _ in range(5):
            for i in range(30):
                await engine.add("q", {"i": i})
            await wait_for(lambda: bool(started), timeout=5, message="claims going on")
            await engine.set_paused("q", True)
            paused = True
            await asyncio.sleep(0.3)  # the pause under test holds this long
            assert [run for run, late in started if late] == []
            await engine.set_paused("q", False)
            paused = False
    finally:
        await engine.stop(1)


async def test_busy_queues_log_no_lost_leases(mongo: Mongo,
                                              caplog: pytest.LogCaptureFixture) -> None:
    async def handler(job: Job) -> None:
        await asyncio.sleep(0.01 * (job.data["i"] % 5))

    reg = QueueRegistry()
    reg.register("q", handler, concurrency=20)
    engine = Engine(mongo, reg, EngineSettings(lease_seconds=0.3, sweep_interval=0.2))
    caplog.set_level(logging.INFO)
    await engine.start()
    try:
        ids = [(await engine.add("q", {"i": i})).run_id for i in range(200)]

        async def all_done() -> bool:
            counts = await engine.runs.count("q", "completed")
            return counts == len(ids)

        await wait_for(all_done, timeout=60, message="every run")
    finally:
        await engine.stop(1)
    noisy = [r.getMessage() for r in caplog.records
             if "no longer ours" in r.getMessage() or "took over" in r.getMessage()]
    assert noisy == []
