"""The due timer: one timer wakes the queues whose delayed runs fall due."""

from __future__ import annotations

import asyncio
import contextvars
from datetime import UTC, datetime, timedelta
from typing import Any

from bson import ObjectId

from mwapjobs.config import EngineSettings
from mwapjobs.duetimer import DueTimer
from mwapjobs.engine import Engine, utcnow
from mwapjobs.queues import Job, QueueRegistry
from mwapjobs.storage.mongo import Mongo
from mwapjobs.storage.names import SCHEDULER_JOBS
from tests.conftest import wait_for


class Store:
    """Delayed runs as the database would list them, and how often it was asked."""

    def __init__(self, runs: list[tuple[datetime, str]] | None = None) -> None:
        self.runs = sorted((when, ObjectId(), queue) for when, queue in runs or [])
        self.reads = 0

    async def load(self, cursor: tuple[datetime, Any], limit: int
                   ) -> list[tuple[datetime, Any, str]]:
        self.reads += 1
        when, after = cursor
        later = [r for r in self.runs
                 if r[0] > when or (r[0] == when and (after is None or r[1] > after))]
        return later[:limit]


def soon(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


async def test_noted_runs_wake_their_queues_in_order() -> None:
    woken: list[tuple[float, dict[str, int]]] = []
    store = Store()
    timer = DueTimer(lambda qs: woken.append((asyncio.get_running_loop().time(), qs)),
                     store.load, utcnow)
    timer.start()
    await wait_for(lambda: store.reads == 1, message="the first page")
    t0 = asyncio.get_running_loop().time()
    timer.note(soon(0.3), "b")
    timer.note(soon(0.1), "a")  # earlier: the timer moves to it
    timer.note(soon(0.1), "c")
    await wait_for(lambda: len(woken) == 2, timeout=3, message="two wake-ups")
    timer.stop()
    (t1, first), (t2, second) = woken
    assert first == {"a": 1, "c": 1} and second == {"b": 1}
    assert 0.08 <= t1 - t0 < 0.25 and 0.28 <= t2 - t0 < 0.5
    assert store.reads == 1  # noting costs no query


async def test_runs_written_before_start_are_read_in_pages() -> None:
    store = Store([(soon(0.1 + i * 0.01), f"q{i % 3}") for i in range(25)])
    woken: set[str] = set()
    timer = DueTimer(woken.update, store.load, utcnow, page=10)
    timer.start()
    await wait_for(lambda: woken == {"q0", "q1", "q2"}, timeout=3, message="all queues")
    await wait_for(lambda: store.reads >= 3, timeout=3, message="three pages")
    timer.stop()
    assert store.reads <= 4  # 25 runs in pages of 10: three pages and an empty one at most


async def test_memory_is_bounded_and_dropped_runs_are_read_back() -> None:
    store = Store()
    woken: list[str] = []
    timer = DueTimer(lambda qs: woken.extend(sorted(qs)), store.load, utcnow, cap=3)
    timer.start()
    await wait_for(lambda: store.reads == 1, message="the first page")
    for i in range(6):  # only the three earliest stay in memory
        when = soon(0.1 + i * 0.05)
        store.runs.append((when, ObjectId(), f"q{i}"))
        timer.note(when, f"q{i}")
    store.runs.sort()
    assert len(timer) == 3
    await wait_for(lambda: len(woken) == 6, timeout=3, message="every queue woken")
    timer.stop()
    assert woken == [f"q{i}" for i in range(6)]


async def test_a_burst_due_at_one_instant_needs_no_more_reads_than_pages() -> None:
    instant = soon(0.2)
    store = Store([(instant, "q")] * 50)
    woken: list[dict[str, int]] = []
    timer = DueTimer(woken.append, store.load, utcnow, page=20)
    timer.start()
    await wait_for(lambda: bool(woken), timeout=3, message="the wake-up")
    await wait_for(lambda: store.reads >= 3, timeout=3, message="the last page")
    timer.stop()
    assert store.reads == 3  # 20 + 20 + 10: the same runs are never read twice


counting: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("counting",
                                                                          default=None)


class CountingMongo(Mongo):
    """Counts the queries made by the task that set `counting` (not by background tasks,
    which were created before and do not see it)."""

    async def call(self, op: Any) -> Any:
        calls = counting.get()
        if calls is not None:
            calls.append(1)
        return await super().call(op)


async def test_adding_a_delayed_run_is_one_insert_and_no_trigger(mongo: Mongo) -> None:
    mongo.__class__ = CountingMongo
    started: list[str] = []

    async def handler(job: Job) -> None:
        started.append(job.run_id)

    reg = QueueRegistry()
    reg.register("q", handler)
    engine = Engine(mongo, reg, EngineSettings(lease_seconds=2, sweep_interval=60))
    await engine.start()
    try:
        calls: list[int] = []
        counting.set(calls)
        added = [await engine.add("q", {"i": i}, delay=0.3 + i * 0.05) for i in range(20)]
        counting.set(None)
        assert len(calls) == 20
        # No trigger either (APScheduler's store is not reached through `mongo.call`; the
        # clock's own passes may read it meanwhile, so its round trips prove nothing).
        assert await mongo.call(lambda db: db[SCHEDULER_JOBS].count_documents({})) == 0
        await wait_for(lambda: len(started) == 20, timeout=10, message="all runs")
        assert started == [a.run_id for a in added]  # each when it fell due, in order
    finally:
        await engine.stop(1)
