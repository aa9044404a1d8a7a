"""The clock of repeats survives what killed APScheduler's thread, and never drops a fire.

Each test injects one of the failures seen on real processes against a real server:
a job-store error mid-pass (`AutoReconnect` just after a fire), a `JobLookupError`
because another instance moved the trigger first, a write of the fire's run that
fails (MongoDB down at the moment of the fire), a thread that dies or hangs. The
clock must go on, readiness must say the truth meanwhile, and every occurrence must
become exactly one run.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from apscheduler.jobstores.base import JobLookupError
from pymongo.errors import AutoReconnect

from mwapjobs import engine as engine_module
from mwapjobs import scheduler as scheduler_module
from mwapjobs.config import EngineSettings
from mwapjobs.engine import Engine, as_utc
from mwapjobs.queues import Job, QueueRegistry
from mwapjobs.storage.jobstore import JobStore
from mwapjobs.storage.mongo import Mongo
from mwapjobs.storage.names import RUNS
from tests.conftest import REAL_MONGODB_URI, TEST_SIGNING_KEY, wait_for
from tests.support.flaky import flaky

# The repeat's interval: on a real server each pass of the clock costs a few round trips,
# and a pass that ends after the next occurrence coalesces it with the one after (by
# design, as after a downtime); a longer grid there keeps lateness from looking like an
# occurrence lost to an error.
EVERY = 0.5 if REAL_MONGODB_URI is None else 2.0
WAIT = 20 * EVERY  # seconds to wait for a few more occurrences


@pytest.fixture(autouse=True)
def quick_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scheduler_module, "RETRY_SECONDS", 0.2)
    monkeypatch.setattr(scheduler_module, "CHECK_SECONDS", 0.1)


@pytest.fixture
async def engines(mongo: Mongo) -> AsyncIterator[Callable[[], Engine]]:
    made: list[Engine] = []

    def make() -> Engine:
        async def handler(job: Job) -> None:
            return None

        reg = QueueRegistry()
        reg.register("q", handler, concurrency=5)
        engine = Engine(mongo, reg, EngineSettings(lease_seconds=2, sweep_interval=0.3),
                        signing_key=TEST_SIGNING_KEY)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        await engine.stop(1)


async def repeat_runs(mongo: Mongo) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = await mongo.call(
        lambda db: db[RUNS].find({"jobId": "tick"}).sort("createdAt", 1).to_list(None))
    return docs


def fire_times(runs: list[dict[str, Any]]) -> list[datetime]:
    return [datetime.fromisoformat(r["slot"].split("@", 1)[1]) for r in runs]


def assert_every_occurrence_once(engines: list[Engine], runs: list[dict[str, Any]]) -> None:
    """Every occurrence of the `EVERY` s grid was fired (none skipped by an error), and
    none became two runs. (A fire while the previous run is still pending adds no run,
    by design, so the runs alone may have gaps on a slow server.)"""
    times = fire_times(runs)
    assert len(set(times)) == len(times), f"an occurrence became two runs: {times}"
    fired = sorted({t for engine in engines for t in FIRES[id(engine)]})
    gaps = [round((b - a).total_seconds(), 3) for a, b in itertools.pairwise(fired)]
    assert all(abs(g - EVERY) < 0.01 for g in gaps), f"occurrences skipped: {gaps}"


FIRES: dict[int, list[datetime]] = {}


async def ticking(engine: Engine) -> None:
    """Start `engine` with the repeat, recording every fire handed to it."""
    # A fresh list: an engine of an earlier test may have had the same id().
    fires: list[datetime] = []
    FIRES[id(engine)] = fires
    hand_off = engine.scheduler._on_repeat

    async def record(queue: str, job_id: str, data: dict[str, Any], fire_time: datetime) -> None:
        fires.append(as_utc(fire_time))
        await hand_off(queue, job_id, data, fire_time)

    engine.scheduler._on_repeat = record
    await engine.start()
    await engine.repeat("q", every=EVERY, job_id="tick")


async def more_runs(mongo: Mongo, than: int, timeout: float = WAIT) -> list[dict[str, Any]]:
    async def enough() -> bool:
        return len(await repeat_runs(mongo)) > than

    await wait_for(enough, timeout=timeout, message=f"more than {than} repeat runs")
    return await repeat_runs(mongo)


def failing(monkeypatch: pytest.MonkeyPatch, method: str, error: BaseException,
            times: int) -> list[int]:
    """Make JobStore.<method> raise `error` on its next `times` calls."""
    original = getattr(JobStore, method)
    raised: list[int] = []

    def patched(self: JobStore, *args: Any) -> Any:
        if len(raised) < times:
            raised.append(1)
            raise error
        return original(self, *args)

    monkeypatch.setattr(JobStore, method, patched)
    return raised


# update_job_if: how the clock moves a trigger on after a fire.
@pytest.mark.parametrize("method", ["update_job_if", "get_next_run_time", "get_due_jobs"])
async def test_a_store_error_mid_pass_does_not_end_the_clock(
        engines: Callable[[], Engine], mongo: Mongo, monkeypatch: pytest.MonkeyPatch,
        method: str, caplog: pytest.LogCaptureFixture) -> None:
    engine = engines()
    await ticking(engine)
    runs = await more_runs(mongo, 0)
    raised = failing(monkeypatch, method, AutoReconnect("connection closed (injected)"), 2)
    await wait_for(lambda: len(raised) == 2, timeout=10, message="the injected errors")
    runs = await more_runs(mongo, len(runs) + 2)
    assert engine.scheduler.healthy and engine.running
    assert engine.scheduler.restarts == 0  # it survived; nothing had to restart it
    if method == "get_due_jobs":
        # Nothing fired while the store could not be read: like a downtime, what fell due
        # meanwhile coalesces into one fire, and nothing becomes two runs.
        assert len(set(fire_times(runs))) == len(runs)
    else:  # a fire happened, and the error came after it: no occurrence is lost
        assert_every_occurrence_once([engine], runs)
    assert "clock pass failed; retrying" in caplog.text


async def test_a_trigger_moved_by_another_instance_is_not_an_error(
        engines: Callable[[], Engine], mongo: Mongo, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = engines()
    await ticking(engine)
    runs = await more_runs(mongo, 0)
    raised = failing(monkeypatch, "update_job_if", JobLookupError("repeat:q:tick"), 1)
    await wait_for(lambda: bool(raised), timeout=10, message="the lookup error")
    runs = await more_runs(mongo, len(runs) + 2)
    assert engine.scheduler.healthy and engine.scheduler.restarts == 0
    assert_every_occurrence_once([engine], runs)


async def test_a_fire_whose_run_cannot_be_written_is_retried_until_it_is(
        mongo: Mongo) -> None:
    every = 2.0
    db = flaky(mongo)

    async def handler(job: Job) -> None:
        return None

    reg = QueueRegistry()
    reg.register("q", handler)
    engine = Engine(db, reg, EngineSettings(lease_seconds=2, sweep_interval=0.3))
    await engine.start()
    try:
        await engine.repeat("q", every=every, job_id="tick")
        [first] = await more_runs(mongo, 0)
        due = fire_times([first])[0] + timedelta(seconds=every)

        async def first_done() -> bool:  # else the next fire is skipped: still pending
            run = await engine.runs.get(first["_id"])
            return run is not None and run["state"] == "completed"

        await wait_for(first_done, timeout=2, message="the first run to complete")
        db.down = True  # MongoDB is away when the next occurrence is due
        await wait_for(lambda: datetime.now(due.tzinfo) > due + timedelta(seconds=0.5),
                       timeout=5, interval=0.01, message="the occurrence to pass")
        back = datetime.now(due.tzinfo)
        db.down = False
        runs = await more_runs(mongo, 1, timeout=5)
        written = runs[1]
        assert fire_times([written])[0] == due  # that very occurrence, not the next one
        assert as_utc(written["createdAt"]) >= back - timedelta(milliseconds=1)  # once it answered
        assert as_utc(written["createdAt"]) < due + timedelta(seconds=every)  # not waiting
        assert engine.scheduler.healthy
    finally:
        await engine.stop(1)


async def test_two_engines_on_one_database_fire_each_occurrence_once(
        engines: Callable[[], Engine], mongo: Mongo) -> None:
    a, b = engines(), engines()
    await ticking(a)
    await ticking(b)  # the same repeat, defined again: left as it is
    assert a.leadership.leading and not b.leadership.leading  # one clock at a time
    assert a.scheduler.clock_running and not b.scheduler.clock_running
    runs = await more_runs(mongo, 6, timeout=2 * WAIT)
    assert a.scheduler.healthy and b.scheduler.healthy
    assert a.scheduler.restarts == b.scheduler.restarts == 0
    assert_every_occurrence_once([a, b], runs)
    await a.stop(1)  # the survivor takes the lease over and goes on
    await wait_for(lambda: b.leadership.leading, timeout=b.leadership.renew_every + 5,
                   message="the survivor leads")
    before = len(runs)
    runs = await more_runs(mongo, before + 3)
    times = fire_times(runs)
    assert len(set(times)) == len(times), f"an occurrence became two runs: {times}"
    # What fell due during the handover is fired once, coalesced; then every occurrence.
    assert_every_occurrence_once([b], runs[before + 1:])


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_a_dead_clock_thread_is_restarted_and_readiness_says_so_meanwhile(
        engines: Callable[[], Engine], mongo: Mongo, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = engines()
    await ticking(engine)
    runs = await more_runs(mongo, 0)
    original_pass = scheduler_module._ClockThread._guarded_pass
    died: list[int] = []

    def die_once(self: Any) -> Any:
        if not died:
            died.append(1)
            raise SystemExit("the thread ends (injected)")
        return original_pass(self)

    blocked = threading.Event()
    blocked.set()
    original_start = scheduler_module.Scheduler._start_sync

    def start_when_allowed(self: Any) -> Any:
        if blocked.is_set():
            raise RuntimeError("MongoDB is away (injected)")
        return original_start(self)

    monkeypatch.setattr(scheduler_module.Scheduler, "_start_sync", start_when_allowed)
    monkeypatch.setattr(scheduler_module._ClockThread, "_guarded_pass", die_once)
    engine.scheduler._clock._event.set()  # type: ignore[union-attr]  # wake it: it dies
    await wait_for(lambda: not engine.running, timeout=5, message="the clock reported down")
    assert engine.scheduler.running  # started, not stopped: readiness says why
    blocked.clear()
    await wait_for(lambda: engine.running, timeout=5, message="the clock restarted")
    assert engine.scheduler.restarts == 1
    runs = await more_runs(mongo, len(runs) + 2)
    assert len(set(fire_times(runs))) == len(runs)


async def test_a_stuck_clock_thread_is_replaced(
        engines: Callable[[], Engine], mongo: Mongo, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scheduler_module, "STUCK_SECONDS", 3.0)  # a slow server's pass is <1 s
    engine = engines()
    await ticking(engine)
    runs = await more_runs(mongo, 0)
    release = threading.Event()
    hung: list[int] = []
    original = JobStore.get_due_jobs

    def hang_once(self: JobStore, now: datetime) -> Any:
        if not hung:
            hung.append(1)
            release.wait(30)  # a server that stopped answering mid-query
        return original(self, now)

    monkeypatch.setattr(JobStore, "get_due_jobs", hang_once)
    try:
        await wait_for(lambda: engine.scheduler.restarts == 1, timeout=15,
                       message="the stuck clock replaced")
        runs = await more_runs(mongo, len(runs) + 2)
        await wait_for(lambda: engine.running, timeout=5, message="the new clock healthy")
        assert engine.scheduler.restarts == 1
    finally:
        release.set()
    assert len(set(fire_times(runs))) == len(runs)


async def test_stopping_never_uses_a_closed_client(
        engines: Callable[[], Engine], mongo: Mongo, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    for _ in range(3):
        engine = engines()
        await ticking(engine)
        await more_runs(mongo, 0)
        await engine.stop(1)
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [m for m in messages if "after close" in m or "job store" in m], messages


async def test_a_slow_clock_start_is_not_doubled_by_the_check(
        engines: Callable[[], Engine], mongo: Mongo, monkeypatch: pytest.MonkeyPatch) -> None:
    """Gaining the lease starts the clock; the check (every CHECK_SECONDS) must not start
    a second one while that start is still on its way (a slow server), or two clock
    threads fire every occurrence in one process, and the one no longer referenced is
    never stopped when the lease is lost."""
    original_start = scheduler_module.Scheduler._start_sync
    started: list[Any] = []

    def slow_start(self: Any) -> Any:
        threading.Event().wait(0.5)  # on the scheduler's I/O thread: 5 checks meanwhile
        clock, store = original_start(self)
        started.append(clock)
        return clock, store

    monkeypatch.setattr(scheduler_module.Scheduler, "_start_sync", slow_start)
    monkeypatch.setattr(engine_module, "CHECK_SECONDS", 0.1)  # the engine's own import
    engine = engines()
    await ticking(engine)
    await more_runs(mongo, 1)
    assert len(started) == 1, f"{len(started)} clocks started"
    await engine.leadership.resign()  # the lease lost: the clock stops
    assert not any(c._thread.is_alive() for c in started), "a clock thread still runs"


async def test_a_clock_being_started_is_not_read_as_a_dead_one(
        engines: Callable[[], Engine], monkeypatch: pytest.MonkeyPatch) -> None:
    """Leadership gained (at start-up, or back after a lapse): while the new leader
    starts its clock, the engine stays ready, as it was as a follower (readiness went
    200, 503, 200 right after start-up)."""
    engine = engines()
    await engine.start()
    scheduler = engine.scheduler
    await scheduler.stop_clock()  # a follower now
    assert scheduler.healthy and engine.running
    entered, release = threading.Event(), threading.Event()
    start_sync = scheduler._start_sync

    def slow_start() -> Any:
        entered.set()
        release.wait(10)
        return start_sync()

    monkeypatch.setattr(scheduler, "_start_sync", slow_start)
    starting = asyncio.ensure_future(scheduler.start_clock())
    await wait_for(entered.is_set, timeout=5, message="the clock's start under way")
    assert scheduler.healthy and engine.running
    release.set()
    await starting
    assert scheduler.clock_running and scheduler.healthy and engine.running
