"""The queue engine running work: results and attempts, deduplication, delays,
priorities, concurrency; failures, retries with backoff, deadlines and timeouts;
event listeners (tests/support/engines.py)."""

from __future__ import annotations

import asyncio
import itertools
import time
from datetime import timedelta
from typing import Any

import pytest

from mwapjobs.engine import utcnow
from mwapjobs.queues import Job, PermanentError, TransientError, UnknownQueueError
from mwapjobs.storage.mongo import Mongo
from tests.conftest import wait_for
from tests.support import engines
from tests.support.engines import (
    TOLERANCE,
    Events,
    FakeClock,
    MakeEngine,
    all_runs,
    doc,
    registry,
    scheduler_jobs,
    seconds,
    wait_state,
)

# This module's fixture (tests/support/engines.py).
make_engine = engines.make_engine


# -- running work ------------------------------------------------------------------


@pytest.mark.parametrize("returned", [
    {"$where": "sleep(1000)"}, {"a.b": 1}, {"nested": [{"$inc": {"n": 1}}]},
])
async def test_a_result_with_operator_or_path_keys_is_stored_as_text(
        make_engine: MakeEngine, returned: dict[str, Any]) -> None:
    """A result is written with `$set`: a key an update would read as an operator or
    a path must not fail the write (the run would be lost to its lease) or change other
    fields; it is kept as text."""
    async def handler(job: Job) -> dict[str, Any]:
        return returned

    engine = await make_engine(registry(handler))
    added = await engine.add("q", {})
    run = await wait_state(engine, added.run_id, "completed", "failed")
    assert run["state"] == "completed" and run["result"] == repr(returned)
    assert run["attemptsMade"] == 1 and "a" not in run and "nested" not in run


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

    # Listeners hear of an outcome once its write is acknowledged, a moment after the
    # stored state can be read.
    expected = ["retrying", "retrying", "completed"]
    await wait_for(lambda: events.names(added.run_id) == expected, timeout=5,
                   message="the listener's events")
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
    expected = ["retrying", "failed"]
    await wait_for(lambda: events.names(added.run_id) == expected, timeout=5,
                   message="the listener's events")
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
    expected = ["failed"]
    await wait_for(lambda: events.names(added.run_id) == expected, timeout=5,
                   message="the listener's events")


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
