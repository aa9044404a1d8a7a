"""APScheduler as the clock: triggers across DST, validation, repeat definitions, misfires."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from apscheduler.triggers.base import BaseTrigger

from mwapjobs.config import EngineSettings
from mwapjobs.engine import Engine, utcnow
from mwapjobs.operations import Operations
from mwapjobs.queues import Job, QueueRegistry, UnknownQueueError
from mwapjobs.scheduler import REPEAT_PREFIX
from mwapjobs.storage.jobstore import JobStore
from mwapjobs.storage.mongo import Mongo
from mwapjobs.storage.names import RUNS, SCHEDULER_JOBS
from mwapjobs.triggers import make_trigger
from tests.conftest import TEST_SIGNING_KEY, wait_for

BERLIN = ZoneInfo("Europe/Berlin")
MakeEngine = Callable[..., Awaitable[Engine]]


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def fires(trigger: BaseTrigger, start: datetime, end: datetime) -> list[datetime]:
    """Every fire time in [start, end), in UTC, the way APScheduler walks a trigger."""
    out: list[datetime] = []
    previous = None
    now = start
    while True:
        nxt = trigger.get_next_fire_time(previous, now)
        if nxt is None or nxt >= end:
            return out
        out.append(nxt.astimezone(UTC))
        previous = now = nxt


def local_day(instant: datetime, tz: ZoneInfo) -> date:
    # Via UTC: astimezone() to the trigger's own zone would keep a non-existent wall time.
    return instant.astimezone(UTC).astimezone(tz).date()


# -- triggers and time zones -----------------------------------------------------------


def test_cron_in_berlin_on_normal_days() -> None:
    trigger = make_trigger("30 2 * * *", None, "Europe/Berlin")
    assert fires(trigger, utc(2026, 1, 14, 12), utc(2026, 1, 16, 12)) == [
        utc(2026, 1, 15, 1, 30), utc(2026, 1, 16, 1, 30)  # CET, UTC+1
    ]
    assert fires(trigger, utc(2026, 7, 1, 12), utc(2026, 7, 3, 12)) == [
        utc(2026, 7, 2, 0, 30), utc(2026, 7, 3, 0, 30)  # CEST, UTC+2
    ]


def test_cron_in_new_york_follows_daylight_saving() -> None:
    trigger = make_trigger("0 9 * * *", None, "America/New_York")
    assert fires(trigger, utc(2026, 1, 15), utc(2026, 1, 16)) == [utc(2026, 1, 15, 14)]
    assert fires(trigger, utc(2026, 7, 15), utc(2026, 7, 16)) == [utc(2026, 7, 15, 13)]
    # 2026-03-08: clocks go forward in the US; 9:00 that morning is already EDT.
    assert fires(trigger, utc(2026, 3, 7), utc(2026, 3, 9)) == [
        utc(2026, 3, 7, 14), utc(2026, 3, 8, 13)
    ]


def test_cron_on_spring_forward_day_fires_once_at_the_next_valid_time() -> None:
    """2026-03-29 in Berlin: 02:00 CET jumps to 03:00 CEST, so 02:30 does not exist."""
    trigger = make_trigger("30 2 * * *", None, "Europe/Berlin")
    times = fires(trigger, utc(2026, 3, 27, 12), utc(2026, 3, 31, 12))
    by_day: dict[date, list[datetime]] = {}
    for t in times:
        by_day.setdefault(local_day(t, BERLIN), []).append(t)
    assert sorted(by_day) == [date(2026, 3, 28), date(2026, 3, 29), date(2026, 3, 30),
                              date(2026, 3, 31)]
    assert all(len(v) == 1 for v in by_day.values()), by_day
    [spring] = by_day[date(2026, 3, 29)]
    # Not skipped, not before the gap: between 03:00 and 03:30 CEST (01:00-01:30 UTC).
    assert utc(2026, 3, 29, 1) <= spring <= utc(2026, 3, 29, 1, 30)
    assert by_day[date(2026, 3, 28)] == [utc(2026, 3, 28, 1, 30)]
    assert by_day[date(2026, 3, 30)] == [utc(2026, 3, 30, 0, 30)]


def test_cron_on_fall_back_day_fires_at_the_first_0230() -> None:
    """2026-10-25 in Berlin: 03:00 CEST goes back to 02:00 CET, so 02:30 happens twice."""
    trigger = make_trigger("30 2 * * *", None, "Europe/Berlin")
    first = trigger.get_next_fire_time(None, utc(2026, 10, 24, 12))
    assert first is not None
    assert first.astimezone(UTC) == utc(2026, 10, 25, 0, 30)  # 02:30 CEST
    after = trigger.get_next_fire_time(None, utc(2026, 10, 25, 2))  # after the repeated hour
    assert after is not None
    assert after.astimezone(UTC) == utc(2026, 10, 26, 1, 30)  # 02:30 CET


def test_cron_on_fall_back_day_does_not_fire_twice() -> None:
    trigger = make_trigger("30 2 * * *", None, "Europe/Berlin")
    times = fires(trigger, utc(2026, 10, 23, 12), utc(2026, 10, 27, 12))
    days = [local_day(t, BERLIN) for t in times]
    assert days.count(date(2026, 10, 25)) == 1, times
    assert times == [utc(2026, 10, 24, 0, 30), utc(2026, 10, 25, 0, 30),
                     utc(2026, 10, 26, 1, 30), utc(2026, 10, 27, 1, 30)]


@pytest.mark.parametrize(
    ("field", "weekdays"),
    [("1", {"Mon"}), ("0", {"Sun"}), ("7", {"Sun"}), ("1-5", {"Mon", "Tue", "Wed", "Thu", "Fri"}),
     ("6,0", {"Sat", "Sun"})],
)
def test_cron_day_of_week_numbers_are_standard_crontab(field: str, weekdays: set[str]) -> None:
    trigger = make_trigger(f"0 9 * * {field}", None, "UTC")
    week = fires(trigger, utc(2026, 6, 1), utc(2026, 6, 8))  # Monday 1 June to Sunday 7 June
    assert {t.strftime("%a") for t in week} == weekdays


def test_cron_day_of_week_names() -> None:
    trigger = make_trigger("0 9 * * mon-fri", None, "UTC")
    week = fires(trigger, utc(2026, 6, 1), utc(2026, 6, 8))
    assert [t.strftime("%a") for t in week] == ["Mon", "Tue", "Wed", "Thu", "Fri"]
    assert all(t.hour == 9 for t in week)


def test_interval_trigger() -> None:
    trigger = make_trigger(None, 90, "UTC")
    start = utc(2026, 5, 1)
    first = trigger.get_next_fire_time(None, start)
    assert first is not None
    assert trigger.get_next_fire_time(first, first) == first + timedelta(seconds=90)


@pytest.mark.parametrize(
    ("cron", "every", "timezone", "message"),
    [
        ("61 * * * *", None, "UTC", r"invalid cron expression '61 \* \* \* \*'"),
        ("* * *", None, "UTC", r"invalid cron expression .*expected 5 fields"),
        ("0 9 * * mon-xyz", None, "UTC", "invalid cron expression"),
        ("0 9 * * *", None, "Mars/Olympus_Mons", "unknown time zone 'Mars/Olympus_Mons'"),
        ("0 9 * * *", None, "", "unknown time zone ''"),
        (None, 60, "Not/AZone", "unknown time zone"),
        ("0 9 * * *", 60, "UTC", "exactly one of cron and every"),
        (None, None, "UTC", "exactly one of cron and every"),
        (None, 0, "UTC", "every must be a positive number of seconds"),
        (None, -5, "UTC", "every must be a positive number of seconds"),
    ],
)
def test_make_trigger_rejects_bad_definitions(cron: str | None, every: float | None,
                                              timezone: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_trigger(cron, every, timezone)


# -- repeat schedules through the engine -------------------------------------------------------


async def nothing(job: Job) -> None:
    return None


@pytest.fixture
async def make_engine(mongo: Mongo) -> AsyncIterator[MakeEngine]:
    engines: list[Engine] = []

    async def make(handler: Callable[[Job], Awaitable[Any]] = nothing, *,
                   start: bool = True, queues: tuple[str, ...] = ("q",)) -> Engine:
        reg = QueueRegistry()
        for name in queues:
            reg.register(name, handler, backoff={"delay": 0.1, "jitter": 0})
        engine = Engine(mongo, reg, EngineSettings(lease_seconds=2, sweep_interval=0.3),
                        signing_key=TEST_SIGNING_KEY)
        engines.append(engine)
        if start:
            await engine.start()
        return engine

    yield make
    for engine in engines:
        await engine.stop(1)


async def runs(mongo: Mongo, query: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return await mongo.call(lambda db: db[RUNS].find(query or {}).to_list(None))


async def test_repeat_with_another_cron_replaces_the_schedule(make_engine: MakeEngine) -> None:
    engine = await make_engine()
    ops = Operations(engine)
    first = await engine.repeat("q", {"a": 1}, cron="0 3 * * *", job_id="x")
    assert first.schedule == "0 3 * * *"
    second = await engine.repeat("q", {"a": 1}, cron="15 4 1 * *", job_id="x")
    assert second.schedule == "15 4 1 * *"

    listed = await ops.repeats()
    assert len(listed) == 1
    [only] = listed
    assert only["jobId"] == "x"
    assert only["queue"] == "q"
    assert only["schedule"] == second.schedule
    next_run = only["nextRunAt"].astimezone(UTC)
    assert (next_run.day, next_run.hour, next_run.minute) == (1, 4, 15)


async def test_identical_repeat_keeps_its_next_fire(make_engine: MakeEngine) -> None:
    engine = await make_engine()
    first = await engine.repeat("q", {"a": 1}, every=3600, job_id="hourly")
    await asyncio.sleep(0.05)  # a re-made interval trigger would start 50 ms later
    again = await engine.repeat("q", {"a": 1}, every=3600, job_id="hourly")
    assert again.next_run_at == first.next_run_at
    [listed] = await Operations(engine).repeats()
    assert listed["nextRunAt"] == first.next_run_at

    # Sanity check of the check above: a changed interval does move the next fire.
    changed = await engine.repeat("q", {"a": 1}, every=7200, job_id="hourly")
    assert changed.next_run_at is not None and first.next_run_at is not None
    assert changed.next_run_at - first.next_run_at >= timedelta(seconds=3600)


async def test_repeat_with_other_data_replaces_it(make_engine: MakeEngine) -> None:
    engine = await make_engine()
    await engine.repeat("q", {"tenant": "a"}, every=3600, job_id="sync")
    await engine.repeat("q", {"tenant": "b"}, every=3600, job_id="sync")
    listed = await Operations(engine).repeats("q")
    assert [(r["jobId"], r["data"]) for r in listed] == [("sync", {"tenant": "b"})]


async def test_repeat_in_another_time_zone_replaces_it(make_engine: MakeEngine) -> None:
    engine = await make_engine()
    await engine.repeat("q", {}, cron="0 9 * * *", timezone="UTC", job_id="morning")
    moved = await engine.repeat("q", {}, cron="0 9 * * *", timezone="America/New_York",
                                job_id="morning")
    assert moved.timezone == "America/New_York"
    [listed] = await Operations(engine).repeats()
    assert listed["timezone"] == "America/New_York"
    assert listed["nextRunAt"].astimezone(ZoneInfo("America/New_York")).hour == 9


async def test_repeat_in_a_time_zone_is_listed_with_it(make_engine: MakeEngine) -> None:
    engine = await make_engine()
    await engine.repeat("q", {}, cron="0 9 * * *", timezone="America/New_York", job_id="m")
    [listed] = await Operations(engine).repeats()
    assert listed["timezone"] == "America/New_York"
    assert listed["schedule"] == "0 9 * * *"
    assert listed["nextRunAt"].astimezone(ZoneInfo("America/New_York")).hour == 9
    assert listed["nextRunAt"] > utcnow()


async def test_repeats_are_per_job_id_and_queue_and_can_be_removed(
    make_engine: MakeEngine,
) -> None:
    engine = await make_engine(queues=("q", "r"))
    ops = Operations(engine)
    await engine.repeat("q", {}, every=600, job_id="one")
    await engine.repeat("q", {}, every=600, job_id="two")
    await engine.repeat("r", {}, every=600)  # job id defaults to the queue's name
    assert sorted(r["jobId"] for r in await ops.repeats()) == ["one", "r", "two"]
    assert sorted(r["jobId"] for r in await ops.repeats("q")) == ["one", "two"]
    assert [r["jobId"] for r in await ops.repeats("r")] == ["r"]

    assert await engine.remove_repeat("q", "one") is True
    assert await engine.remove_repeat("q", "one") is False
    assert sorted(r["jobId"] for r in await ops.repeats()) == ["r", "two"]


async def test_bad_repeat_definitions_are_rejected(make_engine: MakeEngine) -> None:
    engine = await make_engine()
    with pytest.raises(ValueError, match="invalid cron expression"):
        await engine.repeat("q", {}, cron="not a cron")
    with pytest.raises(ValueError, match="unknown time zone"):
        await engine.repeat("q", {}, cron="0 9 * * *", timezone="Europe/Atlantis")
    with pytest.raises(ValueError, match="exactly one of cron and every"):
        await engine.repeat("q", {})
    with pytest.raises(UnknownQueueError):
        await engine.repeat("nope", {}, every=60)
    assert await Operations(engine).repeats() == []


async def test_repeat_fires_create_runs(make_engine: MakeEngine, mongo: Mongo) -> None:
    seen: list[Job] = []

    async def handler(job: Job) -> None:
        seen.append(job)

    engine = await make_engine(handler)
    await engine.repeat("q", {"tenant": "t1"}, every=0.2, job_id="tick")

    async def two_runs() -> bool:
        return len(await runs(mongo, {"state": "completed"})) >= 2

    await wait_for(two_runs, timeout=5, message="two repeat runs")
    assert all(j.job_id == "tick" and j.data == {"tenant": "t1"} for j in seen)
    assert len({j.run_id for j in seen}) == len(seen)


async def test_a_fire_while_the_previous_run_is_pending_adds_nothing(
    make_engine: MakeEngine, mongo: Mongo
) -> None:
    release = asyncio.Event()
    calls = 0

    async def slow(job: Job) -> None:
        nonlocal calls
        calls += 1
        await release.wait()

    engine = await make_engine(slow)
    fired: list[datetime] = []
    hand_off = engine.scheduler._on_repeat

    async def record(queue: str, job_id: str, data: dict[str, Any], fire_time: datetime) -> None:
        fired.append(fire_time)
        await hand_off(queue, job_id, data, fire_time)

    engine.scheduler._on_repeat = record
    await engine.repeat("q", {}, every=0.15, job_id="tick")
    await wait_for(lambda: len(fired) >= 4, timeout=5, message="several fires")
    assert len(await runs(mongo)) == 1
    assert calls == 1
    release.set()


def backdate_repeat(mongo: Mongo, job_key: str, by: timedelta) -> datetime:
    """While no engine runs: make the stored trigger's next fire `by` earlier (a downtime)."""
    store = JobStore(key=TEST_SIGNING_KEY, database=mongo.db_name, collection=SCHEDULER_JOBS,
                     client=mongo.jobstore_client())
    try:
        job = store.lookup_job(job_key)
        assert job is not None
        job.next_run_time = job.next_run_time - by
        store.update_job(job)
        return job.next_run_time
    finally:
        store.shutdown()


async def test_repeat_missed_by_hours_still_fires_once_after_restart(
    make_engine: MakeEngine, mongo: Mongo
) -> None:
    """misfire_grace_time=None: a fire however late still creates its run (APScheduler's
    default grace of one second would drop it), and coalescing makes it one run."""
    # A daily hour two hours back: its latest occurrence is two to three hours old
    # whenever the test runs (a fixed 03:00 was 48 s old when it ran at 03:00:48).
    hour = (utcnow() - timedelta(hours=2)).hour
    a = await make_engine()
    await a.repeat("q", {"daily": True}, cron=f"0 {hour} * * *", job_id="daily")
    await a.stop(1)
    missed_from = await asyncio.to_thread(backdate_repeat, mongo, f"{REPEAT_PREFIX}q:daily",
                                          timedelta(days=3))
    assert missed_from < utcnow() - timedelta(days=2)
    assert await runs(mongo) == []

    b = await make_engine(start=False)
    fired: list[datetime] = []
    hand_off = b.scheduler._on_repeat

    async def record(queue: str, job_id: str, data: dict[str, Any], fire_time: datetime) -> None:
        fired.append(fire_time)
        await hand_off(queue, job_id, data, fire_time)

    b.scheduler._on_repeat = record
    await b.start()

    async def caught_up() -> bool:
        return len(await runs(mongo, {"state": "completed"})) == 1

    await wait_for(caught_up, timeout=3, message="the catch-up run")
    assert len(fired) == 1
    assert fired[0] < utcnow() - timedelta(hours=1)  # a fire for a long-past occurrence
    assert fired[0].astimezone(UTC).hour == hour
    [run] = await runs(mongo)
    assert run["jobId"] == "daily" and run["data"] == {"daily": True}
    [listed] = await Operations(b).repeats()
    assert listed["nextRunAt"] > utcnow()  # moved on past the missed occurrences
    assert len(await runs(mongo)) == 1
