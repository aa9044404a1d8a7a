"""The queue engine end to end: runs on MongoDB (mongomock by default), APScheduler as the clock.

Every timing check uses small intervals (backoff 0.1-0.4 s, leases of 1-2 s,
sweeps every 0.2-0.3 s) or an injected clock, and waits on conditions rather
than fixed sleeps. The only plain sleep simulates a downtime, which is the
scenario under test, not a hope that something has happened.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from bson import ObjectId

from mwapjobs.config import EngineSettings
from mwapjobs.engine import Engine, utcnow
from mwapjobs.operations import Operations
from mwapjobs.queues import (
    Job,
    PermanentError,
    QueueRegistry,
    Retention,
    TransientError,
    UnknownQueueError,
)
from mwapjobs.storage.mongo import Mongo
from mwapjobs.storage.names import RUNS, SCHEDULER_JOBS
from tests.conftest import TEST_SIGNING_KEY, wait_for

Handler = Callable[[Job], Awaitable[Any]]
MakeEngine = Callable[..., Awaitable[Engine]]
TOLERANCE = 0.01  # seconds: MongoDB keeps milliseconds, timers are not exact to the microsecond


class FakeClock:
    """Real time plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)


class Events:
    """A listener that records every event."""

    def __init__(self) -> None:
        self.items: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, event: str, run: dict[str, Any]) -> None:
        self.items.append((event, run))

    def names(self, run_id: str | None = None) -> list[str]:
        return [e for e, r in self.items if run_id is None or r.get("runId") == run_id]

    def of(self, name: str) -> list[dict[str, Any]]:
        return [r for e, r in self.items if e == name]


def registry(handler: Handler, name: str = "q", **options: Any) -> QueueRegistry:
    reg = QueueRegistry()
    defaults: dict[str, Any] = {"backoff": {"delay": 0.1, "jitter": 0}, "attempts": 3,
                                "concurrency": 2}
    reg.register(name, handler, **{**defaults, **options})
    return reg


@pytest.fixture
async def make_engine(mongo: Mongo) -> AsyncIterator[MakeEngine]:
    """Build (and by default start) engines; every one is stopped at teardown."""
    engines: list[Engine] = []

    async def make(reg: QueueRegistry, *, clock: Callable[[], datetime] = utcnow,
                   start: bool = True, **settings: Any) -> Engine:
        options = {"lease_seconds": 2, "sweep_interval": 0.3, **settings}
        engine = Engine(mongo, reg, EngineSettings(**options), clock=clock,
                        signing_key=TEST_SIGNING_KEY)
        engines.append(engine)
        if start:
            await engine.start()
        return engine

    yield make
    for engine in engines:
        await engine.stop(1)


async def doc(engine: Engine, run_id: str) -> dict[str, Any]:
    found = await engine.runs.get(ObjectId(run_id))
    assert found is not None, f"run {run_id} does not exist"
    return found


async def wait_state(engine: Engine, run_id: str, *states: str,
                     timeout: float = 10) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    async def reached() -> bool:
        seen["doc"] = await doc(engine, run_id)
        return seen["doc"]["state"] in states

    await wait_for(reached, timeout=timeout, message=f"run {run_id} to become {states}")
    return seen["doc"]


async def all_runs(mongo: Mongo, query: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return await mongo.call(lambda db: db[RUNS].find(query or {}).to_list(None))


async def scheduler_jobs(mongo: Mongo) -> list[dict[str, Any]]:
    """APScheduler's stored triggers: only repeats have one, delayed runs none."""
    return await mongo.call(lambda db: db[SCHEDULER_JOBS].find({}).to_list(None))


def seconds(a: datetime, b: datetime) -> float:
    """b - a in seconds."""
    return (b - a).total_seconds()


# -- running work ------------------------------------------------------------------


async def test_added_run_executes_and_records_result_and_attempt(make_engine: MakeEngine) -> None:
    seen: list[Job] = []

    async def handler(job: Job) -> dict[str, Any]:
        seen.append(job)
        await asyncio.sleep(0.02)
        return {"doubled": job.data["n"] * 2}

    engine = await make_engine(registry(handler))
    added = await engine.add("q", {"n": 21})
    assert added.created is True
    run = await wait_state(engine, added.run_id, "completed")

    assert run["result"] == {"doubled": 42}
    assert run["error"] is None
    assert run["attemptsMade"] == 1
    assert "leaseOwner" not in run and "leaseUntil" not in run
    [attempt] = run["attempts"]
    assert set(attempt) == {"attempt", "startedAt", "finishedAt", "durationMs", "outcome"}
    assert attempt["attempt"] == 1
    assert attempt["outcome"] == "completed"
    assert attempt["durationMs"] >= 20 - TOLERANCE * 1000
    assert run["durationMs"] == attempt["durationMs"] > 0
    assert attempt["startedAt"] <= attempt["finishedAt"] == run["finishedAt"]
    assert [j.run_id for j in seen] == [added.run_id]
    assert seen[0].attempt == 1 and seen[0].max_attempts == 3 and seen[0].queue == "q"


async def test_add_rejects_unknown_queue_and_bad_options(make_engine: MakeEngine) -> None:
    async def handler(job: Job) -> None:
        return None

    engine = await make_engine(registry(handler))
    with pytest.raises(UnknownQueueError):
        await engine.add("nope", {})
    with pytest.raises(ValueError, match="delay or run_at"):
        await engine.add("q", {}, delay=1, run_at=utcnow())
    with pytest.raises(ValueError, match="attempts"):
        await engine.add("q", {}, attempts=0)
    assert await engine.runs.count("q", "waiting") == 0


async def test_same_job_id_while_pending_is_deduplicated(make_engine: MakeEngine,
                                                         mongo: Mongo) -> None:
    calls: list[str] = []

    async def handler(job: Job) -> None:
        calls.append(job.run_id)

    engine = await make_engine(registry(handler))
    first = await engine.add("q", {"v": 1}, job_id="sync-42", delay=0.3)
    second = await engine.add("q", {"v": 2}, job_id="sync-42", delay=0.3)
    assert first.created is True
    assert second.created is False
    assert second.run_id == first.run_id
    assert len(await all_runs(mongo)) == 1

    run = await wait_state(engine, first.run_id, "completed")
    assert run["data"] == {"v": 1}  # the duplicate did not overwrite (no replace)
    assert calls == [first.run_id]
    assert "key" not in run  # a finished run no longer holds the job id

    third = await engine.add("q", {"v": 3}, job_id="sync-42")
    assert third.created is True
    assert third.run_id != first.run_id
    await wait_state(engine, third.run_id, "completed")
    assert calls == [first.run_id, third.run_id]
    assert len(await all_runs(mongo, {"jobId": "sync-42"})) == 2


async def test_replace_moves_a_delayed_run(make_engine: MakeEngine, mongo: Mongo) -> None:
    async def handler(job: Job) -> None:
        return None

    engine = await make_engine(registry(handler))
    first = await engine.add("q", {"v": 1}, job_id="r", delay=600)

    before = utcnow()
    moved = await engine.add("q", {"v": 2}, job_id="r", delay=1200, replace=True)
    assert moved.run_id == first.run_id
    assert moved.created is False
    assert moved.state == "delayed"
    runs = await all_runs(mongo)
    assert len(runs) == 1
    run = runs[0]
    assert run["data"] == {"v": 2}
    assert 1200 - 1 <= seconds(before, run["runAt"]) <= 1200 + 1
    assert await scheduler_jobs(mongo) == []  # a delayed run needs no trigger

    # Replacing with "now" makes it waiting at once: it runs.
    now = await engine.add("q", {"v": 3}, job_id="r", replace=True)
    assert now.run_id == first.run_id
    done = await wait_state(engine, first.run_id, "completed")
    assert done["data"] == {"v": 3}
    assert len(await all_runs(mongo)) == 1


async def test_delayed_run_waits_for_its_time(make_engine: MakeEngine) -> None:
    started: list[float] = []

    async def handler(job: Job) -> None:
        started.append(time.monotonic())

    engine = await make_engine(registry(handler))
    t0 = time.monotonic()
    added = await engine.add("q", {}, delay=0.4)
    assert added.state == "delayed"
    assert (await doc(engine, added.run_id))["state"] == "delayed"
    assert started == []

    run = await wait_state(engine, added.run_id, "completed")
    assert started[0] - t0 >= 0.4 - TOLERANCE
    assert started[0] - t0 < 0.4 + 1.0  # the trigger fired; no waiting for a slow sweep
    assert run["attempts"][0]["startedAt"] >= run["runAt"]
    assert seconds(run["createdAt"], run["runAt"]) == pytest.approx(0.4, abs=0.01)


async def test_higher_priority_runs_first(make_engine: MakeEngine) -> None:
    order: list[str] = []

    async def handler(job: Job) -> None:
        order.append(job.data["name"])

    engine = await make_engine(registry(handler, concurrency=1))
    await engine.set_paused("q", True)
    ids = [
        (await engine.add("q", {"name": "low"}, priority=0)).run_id,
        (await engine.add("q", {"name": "high"}, priority=10)).run_id,
        (await engine.add("q", {"name": "mid"}, priority=5)).run_id,
        (await engine.add("q", {"name": "low2"}, priority=0)).run_id,
    ]
    await engine.set_paused("q", False)
    for run_id in ids:
        await wait_state(engine, run_id, "completed")
    assert order == ["high", "mid", "low", "low2"]


async def test_concurrency_limit_is_never_exceeded(make_engine: MakeEngine) -> None:
    running = 0
    peak = 0

    async def handler(job: Job) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.1)
        running -= 1

    engine = await make_engine(registry(handler, concurrency=2))
    ids = [(await engine.add("q", {"i": i})).run_id for i in range(6)]
    for run_id in ids:
        await wait_state(engine, run_id, "completed")
    assert peak == 2


# -- failures and retries ----------------------------------------------------------------


async def test_retries_with_exponential_backoff_then_completes(make_engine: MakeEngine) -> None:
    starts: list[float] = []
    delay = 0.2

    async def handler(job: Job) -> str:
        starts.append(time.monotonic())
        if job.attempt < 3:
            raise RuntimeError(f"flaky {job.attempt}")
        return "ok"

    engine = await make_engine(registry(handler, backoff={"delay": delay, "jitter": 0}))
    events = Events()
    engine.subscribe(events)
    added = await engine.add("q", {})
    run = await wait_state(engine, added.run_id, "completed")

    assert run["attemptsMade"] == 3
    assert [a["attempt"] for a in run["attempts"]] == [1, 2, 3]
    assert [a["outcome"] for a in run["attempts"]] == ["retrying", "retrying", "completed"]
    assert run["attempts"][0]["error"] == {"message": "flaky 1", "type": "RuntimeError",
                                           "permanent": False}
    assert run["result"] == "ok"
    assert run["error"] is None

    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps[0] >= delay - TOLERANCE
    assert gaps[1] >= 2 * delay - TOLERANCE
    assert gaps[0] < delay + 1.0 and gaps[1] < 2 * delay + 1.0
    # The same gaps in the stored attempt history.
    a1, a2, a3 = (a["startedAt"] for a in run["attempts"])
    assert seconds(a1, a2) >= delay - TOLERANCE
    assert seconds(a2, a3) >= 2 * delay - TOLERANCE

    assert events.names(added.run_id) == ["retrying", "retrying", "completed"]
    retrying = events.of("retrying")
    assert [r["attempt"] for r in retrying] == [1, 2]
    assert retrying[0]["error"]["message"] == "flaky 1"
    assert events.of("completed")[0]["result"] == "ok"


async def test_exhausted_attempts_fail_the_run(make_engine: MakeEngine) -> None:
    calls = 0

    async def handler(job: Job) -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError("upstream down")

    engine = await make_engine(registry(handler, attempts=2,
                                        backoff={"delay": 0.05, "jitter": 0}))
    events = Events()
    engine.subscribe(events)
    added = await engine.add("q", {})
    run = await wait_state(engine, added.run_id, "failed")

    assert run["error"] == {"message": "upstream down", "type": "ConnectionError",
                            "permanent": False}
    assert run["attemptsMade"] == 2
    assert [a["outcome"] for a in run["attempts"]] == ["retrying", "failed"]
    assert calls == 2
    assert events.names(added.run_id) == ["retrying", "failed"]
    assert events.of("failed")[0]["error"]["type"] == "ConnectionError"


async def test_permanent_error_fails_without_retry(make_engine: MakeEngine) -> None:
    calls = 0

    async def handler(job: Job) -> None:
        nonlocal calls
        calls += 1
        raise PermanentError("grant revoked")

    engine = await make_engine(registry(handler, attempts=5))
    events = Events()
    engine.subscribe(events)
    added = await engine.add("q", {})
    run = await wait_state(engine, added.run_id, "failed")

    assert calls == 1
    assert run["attemptsMade"] == 1
    assert run["error"] == {"message": "grant revoked", "type": "PermanentError",
                            "permanent": True}
    assert [a["outcome"] for a in run["attempts"]] == ["failed"]
    assert events.names(added.run_id) == ["failed"]


async def test_transient_retry_after_is_honoured(make_engine: MakeEngine) -> None:
    """With an injected clock: a 429's retry_after of 10 minutes beats a 0.1 s backoff."""
    clock = FakeClock()
    calls = 0

    async def handler(job: Job) -> str:
        nonlocal calls
        calls += 1
        if job.attempt == 1:
            raise TransientError("rate limited", retry_after=600)
        return "done"

    engine = await make_engine(registry(handler), clock=clock, sweep_interval=0.2)
    added = await engine.add("q", {})
    run = await wait_state(engine, added.run_id, "delayed")
    failed_at = run["attempts"][0]["finishedAt"]
    assert seconds(failed_at, run["runAt"]) == pytest.approx(600, abs=0.01)
    assert run["attempts"][0]["error"]["type"] == "TransientError"

    clock.advance(599)
    await engine.sweep()  # the sweep promotes due runs; this one is not due yet
    assert (await doc(engine, added.run_id))["state"] == "delayed"
    assert calls == 1

    clock.advance(2)
    run = await wait_state(engine, added.run_id, "completed")
    assert calls == 2
    assert run["attempts"][1]["startedAt"] >= run["runAt"]


async def test_transient_retry_after_small_interval(make_engine: MakeEngine) -> None:
    starts: list[float] = []

    async def handler(job: Job) -> None:
        starts.append(time.monotonic())
        if job.attempt == 1:
            raise TransientError("slow down", retry_after=0.4)

    engine = await make_engine(registry(handler, backoff={"delay": 0.05, "jitter": 0}))
    added = await engine.add("q", {})
    await wait_state(engine, added.run_id, "completed")
    assert starts[1] - starts[0] >= 0.4 - TOLERANCE


async def test_deadline_sooner_than_next_retry_fails_now(make_engine: MakeEngine) -> None:
    calls = 0

    async def handler(job: Job) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("not yet")

    engine = await make_engine(registry(handler, attempts=5,
                                        backoff={"delay": 5, "jitter": 0}))
    events = Events()
    engine.subscribe(events)
    deadline = utcnow() + timedelta(seconds=2)
    added = await engine.add("q", {}, deadline=deadline)
    run = await wait_state(engine, added.run_id, "failed", timeout=1.5)

    assert calls == 1
    assert run["attemptsMade"] == 1
    assert run["error"]["deadlineExceeded"] is True
    assert run["error"]["type"] == "RuntimeError"
    assert run["error"]["permanent"] is False
    assert events.of("failed")[0]["error"]["deadlineExceeded"] is True


async def test_deadline_later_than_next_retry_still_retries(make_engine: MakeEngine) -> None:
    async def handler(job: Job) -> None:
        if job.attempt == 1:
            raise RuntimeError("once")

    engine = await make_engine(registry(handler, backoff={"delay": 0.1, "jitter": 0}))
    added = await engine.add("q", {}, deadline=utcnow() + timedelta(seconds=30))
    run = await wait_state(engine, added.run_id, "completed")
    assert run["attemptsMade"] == 2


async def test_timeout_fails_the_attempt(make_engine: MakeEngine) -> None:
    cancelled = asyncio.Event()

    async def handler(job: Job) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    engine = await make_engine(registry(handler, attempts=1))
    t0 = time.monotonic()
    added = await engine.add("q", {}, timeout=0.2)
    run = await wait_state(engine, added.run_id, "failed", timeout=5)

    assert time.monotonic() - t0 < 5
    assert cancelled.is_set()
    assert run["error"]["type"] == "TimeoutError"
    assert "0.2" in run["error"]["message"]
    assert run["error"]["permanent"] is False
    assert run["attempts"][0]["durationMs"] >= 200 - TOLERANCE * 1000
    assert run["attempts"][0]["durationMs"] < 5000


# -- crash recovery ----------------------------------------------------------------------


async def test_expired_lease_after_crash_is_recovered_by_another_engine(
    make_engine: MakeEngine, mongo: Mongo
) -> None:
    started = asyncio.Event()

    async def hang(job: Job) -> None:
        started.set()
        await asyncio.Event().wait()

    a = await make_engine(registry(hang), lease_seconds=1, sweep_interval=0.2)
    added = await a.add("q", {"k": "v"})
    await asyncio.wait_for(started.wait(), 5)
    await a.kill()  # as SIGKILL: nothing is written back
    orphan = await doc(a, added.run_id)
    assert orphan["state"] == "active"
    assert orphan["leaseOwner"] == a.owner
    assert orphan["attemptsMade"] == 1

    ran: list[Job] = []

    async def work(job: Job) -> str:
        ran.append(job)
        return "recovered"

    b = await make_engine(registry(work), lease_seconds=1, sweep_interval=0.2, start=False)
    events = Events()
    b.subscribe(events)
    await b.start()  # a is gone from this process: its runs are taken back at once
    run = await wait_state(b, added.run_id, "completed", timeout=5)

    assert [j.run_id for j in ran] == [added.run_id]
    assert ran[0].attempt == 1  # the attempt that never finished was refunded
    assert ran[0].data == {"k": "v"}
    assert run["stalledCount"] == 1
    assert run["attemptsMade"] == 1
    assert run["result"] == "recovered"
    assert [a["outcome"] for a in run["attempts"]] == ["completed"]
    stalled = events.of("stalled")
    assert len(stalled) == 1
    assert stalled[0]["runId"] == added.run_id
    assert stalled[0]["movedTo"] == "waiting"


async def insert_orphan(engine: Engine, *, stalled: int) -> str:
    """An active run left behind by a dead process whose lease ran out a minute ago."""
    now = utcnow()
    oid = ObjectId()
    await engine.runs.insert({
        "_id": oid, "queue": "q", "jobId": "orphan", "key": "q:orphan", "data": {},
        "state": "active", "priority": 0, "runAt": now - timedelta(minutes=5),
        "attemptsMade": 1, "maxAttempts": 3, "backoff": {"delay": 0.1, "jitter": 0},
        "timeout": 60.0, "deadline": None, "createdAt": now - timedelta(minutes=5),
        "attempts": [], "startedAt": now - timedelta(minutes=2), "stalledCount": stalled,
        "leaseOwner": "deadhost:1:00000000", "leaseUntil": now - timedelta(minutes=1),
    })
    return str(oid)


async def test_run_that_keeps_stalling_fails(make_engine: MakeEngine) -> None:
    calls = 0

    async def handler(job: Job) -> None:
        nonlocal calls
        calls += 1

    engine = await make_engine(registry(handler), start=False, stalled_limit=1)
    events = Events()
    engine.subscribe(events)
    run_id = await insert_orphan(engine, stalled=1)
    await engine.start()  # the sweep at start finds it
    run = await doc(engine, run_id)

    assert run["state"] == "failed"
    assert run["stalledCount"] == 2
    assert run["error"]["type"] == "Stalled"
    assert run["error"]["permanent"] is True
    assert "leaseOwner" not in run and "key" not in run
    assert events.of("stalled")[0]["movedTo"] == "failed"
    assert calls == 0
    again = await engine.add("q", {}, job_id="orphan")  # the job id is free again
    assert again.created is True


async def test_stall_within_limit_is_requeued_at_start(make_engine: MakeEngine) -> None:
    calls = 0

    async def handler(job: Job) -> None:
        nonlocal calls
        calls += 1

    engine = await make_engine(registry(handler), start=False, stalled_limit=2)
    run_id = await insert_orphan(engine, stalled=1)
    await engine.start()
    run = await wait_state(engine, run_id, "completed")
    assert run["stalledCount"] == 2
    assert calls == 1


async def test_own_running_run_is_never_swept_as_stalled(make_engine: MakeEngine,
                                                         mongo: Mongo) -> None:
    release = asyncio.Event()
    calls = 0

    async def handler(job: Job) -> str:
        nonlocal calls
        calls += 1
        await release.wait()
        return "finished"

    engine = await make_engine(registry(handler), lease_seconds=60, sweep_interval=0.2)
    events = Events()
    engine.subscribe(events)
    added = await engine.add("q", {})
    await wait_state(engine, added.run_id, "active")
    oid = ObjectId(added.run_id)
    past = utcnow() - timedelta(minutes=5)
    await mongo.call(lambda db: db[RUNS].update_one({"_id": oid},
                                                    {"$set": {"leaseUntil": past}}))
    assert engine.owner in await engine.runs.expired_owners(utcnow())  # it does look expired

    await engine.sweep()
    run = await doc(engine, added.run_id)
    assert run["state"] == "active"
    assert run["leaseOwner"] == engine.owner
    assert "stalledCount" not in run

    release.set()
    run = await wait_state(engine, added.run_id, "completed")
    assert calls == 1
    assert run["result"] == "finished"
    assert "stalledCount" not in run
    assert events.of("stalled") == []


async def test_lease_is_renewed_while_a_long_job_runs(make_engine: MakeEngine) -> None:
    release = asyncio.Event()

    async def handler(job: Job) -> None:
        await release.wait()

    engine = await make_engine(registry(handler), lease_seconds=0.6, sweep_interval=0.2)
    added = await engine.add("q", {})
    first = await wait_state(engine, added.run_id, "active")

    async def renewed() -> bool:
        current = await doc(engine, added.run_id)
        return bool(current["leaseUntil"] >= first["leaseUntil"] + timedelta(seconds=0.5))

    await wait_for(renewed, timeout=5, message="lease renewal")
    release.set()
    run = await wait_state(engine, added.run_id, "completed")
    assert "stalledCount" not in run


# -- downtime -----------------------------------------------------------------------------


async def test_missed_repeats_coalesce_into_one_catch_up_run(make_engine: MakeEngine,
                                                             mongo: Mongo) -> None:
    """An interval repeat misses several occurrences while no engine runs; the next start
    makes exactly one run for them, at once, for the latest missed occurrence."""
    every = 1.0  # half of it must cover a start, which takes longer on a real server

    async def handler(job: Job) -> None:
        return None

    a = await make_engine(registry(handler))
    await a.repeat("q", {"k": 1}, every=every, job_id="tick")
    [info] = await Operations(a).repeats()
    grid = info["nextRunAt"]  # occurrences are grid + k * every

    async def a_ran() -> bool:
        return len(await all_runs(mongo, {"state": "completed"})) >= 1

    await wait_for(a_ran, timeout=5, message="a first repeat run")
    await a.stop(5)
    before = {r["_id"] for r in await all_runs(mongo)}

    # The downtime: at least 1.2 s (three or more occurrences), ending half-way between
    # two occurrences so that the catch-up fire cannot be confused with a regular one.
    k = math.ceil((seconds(grid, utcnow()) + 1.2) / every)
    last_missed = grid + timedelta(seconds=k * every)
    restart_at = last_missed + timedelta(seconds=every / 2)
    await wait_for(lambda: utcnow() >= restart_at, timeout=5, interval=0.005,
                   message="the end of the downtime")

    b = await make_engine(registry(handler), start=False)
    fires: list[datetime] = []
    hand_off = b.scheduler._on_repeat

    async def record(queue: str, job_id: str, data: dict[str, Any], fire_time: datetime) -> None:
        fires.append(fire_time)
        await hand_off(queue, job_id, data, fire_time)

    b.scheduler._on_repeat = record
    restart = utcnow()
    await b.start()

    async def caught_up() -> bool:
        return any(r["_id"] not in before for r in await all_runs(mongo))

    await wait_for(caught_up, timeout=2, message="the catch-up run")
    missed = [f for f in fires if f < restart]
    assert len(missed) == 1, f"missed occurrences should coalesce into one fire: {fires}"
    assert abs(seconds(missed[0], last_missed)) < 0.002  # the latest missed occurrence
    new = sorted((r for r in await all_runs(mongo) if r["_id"] not in before),
                 key=lambda r: r["createdAt"])
    assert seconds(restart, new[0]["createdAt"]) < 0.5  # promptly, not at the next occurrence
    next_due = last_missed + timedelta(seconds=every - 0.002)
    assert len([r for r in new if r["createdAt"] < next_due]) == 1  # one, not one per miss
    assert new[0]["jobId"] == "tick" and new[0]["data"] == {"k": 1}
    await wait_state(b, str(new[0]["_id"]), "completed")


async def test_overdue_delayed_run_runs_once_after_downtime(make_engine: MakeEngine,
                                                             mongo: Mongo) -> None:
    calls: list[str] = []

    async def handler(job: Job) -> None:
        calls.append(job.run_id)

    a = await make_engine(registry(handler))
    added = await a.add("q", {}, delay=0.3)
    await a.stop(1)
    run_at = (await doc(a, added.run_id))["runAt"]
    await wait_for(lambda: utcnow() > run_at + timedelta(seconds=0.1), timeout=2,
                   message="the run to become overdue")
    assert (await doc(a, added.run_id))["state"] == "delayed"

    b = await make_engine(registry(handler))
    run = await wait_state(b, added.run_id, "completed", timeout=3)
    await b.sweep()  # a sweep does not bring it back
    assert calls == [added.run_id]
    assert len(run["attempts"]) == 1
    assert (await doc(b, added.run_id))["attemptsMade"] == 1


# -- shutdown ------------------------------------------------------------------------------


async def test_stop_lets_a_short_job_finish(make_engine: MakeEngine) -> None:
    started = asyncio.Event()

    async def handler(job: Job) -> str:
        started.set()
        await asyncio.sleep(0.3)
        return "finished"

    engine = await make_engine(registry(handler))
    added = await engine.add("q", {})
    await asyncio.wait_for(started.wait(), 5)
    await engine.stop(5)
    run = await doc(engine, added.run_id)
    assert run["state"] == "completed"
    assert run["result"] == "finished"
    assert engine.running is False


async def test_stop_hands_an_unfinished_job_back(make_engine: MakeEngine) -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def slow(job: Job) -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    a = await make_engine(registry(slow))
    added = await a.add("q", {"n": 1})
    await asyncio.wait_for(started.wait(), 5)
    t0 = time.monotonic()
    await a.stop(0.3)
    assert 0.3 - TOLERANCE <= time.monotonic() - t0 < 3
    assert cancelled.is_set()
    run = await doc(a, added.run_id)
    assert run["state"] == "waiting"
    assert run["attemptsMade"] == 0
    assert run["attempts"] == []
    assert "leaseOwner" not in run and "leaseUntil" not in run

    done: list[Job] = []

    async def quick(job: Job) -> str:
        done.append(job)
        return "second try"

    b = await make_engine(registry(quick))
    run = await wait_state(b, added.run_id, "completed")
    assert [j.attempt for j in done] == [1]
    assert run["attemptsMade"] == 1
    assert run["result"] == "second try"
    assert "stalledCount" not in run


async def test_stopped_engine_claims_nothing(make_engine: MakeEngine, mongo: Mongo) -> None:
    calls = 0

    async def handler(job: Job) -> None:
        nonlocal calls
        calls += 1

    engine = await make_engine(registry(handler))
    await engine.stop(1)
    assert engine.running is False
    run = await engine.add("q", {})  # written, to be run by the next start
    assert (await doc(engine, run.run_id))["state"] == "waiting"
    assert calls == 0


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


# -- events --------------------------------------------------------------------------------------


async def test_failing_listeners_do_not_affect_jobs(make_engine: MakeEngine) -> None:
    async def handler(job: Job) -> str:
        return "ok"

    engine = await make_engine(registry(handler))

    def broken(event: str, run: dict[str, Any]) -> None:
        raise RuntimeError("listener bug")

    async def broken_async(event: str, run: dict[str, Any]) -> None:
        raise ValueError("async listener bug")

    events = Events()
    engine.subscribe(broken)
    engine.subscribe(broken_async)
    engine.subscribe(events)
    added = await engine.add("q", {})
    run = await wait_state(engine, added.run_id, "completed")
    assert run["result"] == "ok"
    assert run["attemptsMade"] == 1
    await wait_for(lambda: events.names(added.run_id) == ["completed"], timeout=2,
                   message="the completed event")


async def test_unsubscribe_stops_events(make_engine: MakeEngine) -> None:
    async def handler(job: Job) -> None:
        return None

    engine = await make_engine(registry(handler))
    kept, dropped = Events(), Events()
    engine.subscribe(kept)
    unsubscribe = engine.subscribe(dropped)
    unsubscribe()
    added = await engine.add("q", {})
    await wait_state(engine, added.run_id, "completed")
    await wait_for(lambda: kept.names() == ["completed"], timeout=2, message="event")
    assert dropped.items == []
