"""The queue engine after a crash, a downtime and a stop: leases taken back from dead
processes, runs that keep stalling, missed repeats coalescing into one catch-up run,
overdue delayed runs, draining and handing back unfinished jobs.

The only wait for a moment rather than a condition is the downtime, which is the
scenario under test, not a hope that something has happened."""

from __future__ import annotations

import asyncio
import math
import time
from datetime import datetime, timedelta
from typing import Any

from bson import ObjectId
from pymongo.errors import NetworkTimeout

from mwapjobs.engine import Added, Engine, utcnow
from mwapjobs.operations import Operations
from mwapjobs.queues import Job
from mwapjobs.storage.mongo import Mongo
from mwapjobs.storage.names import RUNS
from tests.conftest import wait_for
from tests.support import engines
from tests.support.engines import (
    TOLERANCE,
    Events,
    MakeEngine,
    all_runs,
    doc,
    registry,
    seconds,
    wait_state,
)

# This module's fixture (tests/support/engines.py).
make_engine = engines.make_engine


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
    add = b.add

    async def record(queue: str, data: dict[str, Any] | None = None, **options: Any) -> Added:
        # Every fire of a repeat adds its run naming the occurrence, `slot` ("q:tick@<fire
        # time>"), also a fire whose run is not made because the previous one is pending.
        if options.get("slot") is not None:
            fires.append(datetime.fromisoformat(options["slot"].split("@", 1)[1]))
        return await add(queue, data, **options)

    b.add = record  # type: ignore[method-assign]
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


async def test_a_claim_whose_answer_was_lost_is_handed_back_and_run(
        make_engine: MakeEngine) -> None:
    """MongoDB carried out the claim but its answer never came (a frozen server, a socket
    timeout): the run is active under this live process, which does not know it. Once
    the lease runs out, the sweep hands it back (attempt refunded) and it runs once."""
    ran: list[int] = []

    async def handler(job: Job) -> str:
        ran.append(job.attempt)
        return "ran"

    engine = await make_engine(registry(handler), lease_seconds=0.6, sweep_interval=0.2)
    claim = engine.runs.claim
    lost: list[str] = []

    async def answer_lost(queue: str, *args: Any) -> list[dict[str, Any]]:
        claimed = await claim(queue, *args)
        if claimed and not lost:
            lost.extend(str(r["_id"]) for r in claimed)
            raise NetworkTimeout("timed out (the claim was carried out)")
        return claimed

    engine.runs.claim = answer_lost  # type: ignore[method-assign]
    added = await engine.add("q", {})
    run = await wait_state(engine, added.run_id, "completed")
    assert lost == [added.run_id]  # the first claim took it, and its answer was lost
    assert ran == [1]
    assert run["attemptsMade"] == 1 and len(run["attempts"]) == 1
    assert "stalledCount" not in run and not run.get("crashes")


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


async def test_stop_drains_the_runs_of_a_claim_in_flight(make_engine: MakeEngine) -> None:
    """A claim answered after `stop` began leased its runs to this process: they run and
    their outcomes are written before `stop` returns. Started unseen (or cancelled in
    the claim), they stay active under an exiting process and run again elsewhere: a
    second effect after a graceful restart."""
    ran: list[str] = []

    async def handler(job: Job) -> str:
        ran.append(job.run_id)
        return "once"

    engine = await make_engine(registry(handler))
    gate = asyncio.Event()
    in_flight = asyncio.Event()
    claim = engine.runs.claim

    async def slow_claim(queue: str, *args: Any) -> list[dict[str, Any]]:
        claimed = await claim(queue, *args)
        if claimed:  # leased in the database; the answer is still on the wire
            in_flight.set()
            await gate.wait()
        return claimed

    engine.runs.claim = slow_claim  # type: ignore[method-assign]
    added = await engine.add("q", {})
    await asyncio.wait_for(in_flight.wait(), 5)
    stopping = asyncio.ensure_future(engine.stop(5))
    await wait_for(lambda: not engine.running, timeout=5, message="the stop under way")
    gate.set()
    await asyncio.wait_for(stopping, 10)
    run = await doc(engine, added.run_id)
    assert run["state"] == "completed", run["state"]
    assert run["result"] == "once"
    assert ran == [added.run_id]
    assert "leaseOwner" not in run

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
