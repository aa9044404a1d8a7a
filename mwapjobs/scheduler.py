"""APScheduler 3 as the one clock: it persists triggers and says when they fire.

APScheduler's `MongoDBJobStore` speaks synchronous pymongo and its schedulers
call the store on whatever thread calls them. So APScheduler runs as a
`BackgroundScheduler` in its own thread, and every call we make into it goes
through one dedicated worker thread (`_in_thread`). The event loop never runs a
pymongo call.

A trigger does not run job code. `FireExecutor` turns a fire into work for the
engine:
- a *wake* trigger marks a tenth of a second in which delayed runs fall due.
  Their run documents already exist, so a fire only wakes the engine, which
  promotes every due run in one query; 10,000 runs due together share one
  trigger;
- a *repeat* trigger (cron or interval) creates a run; the executor waits until
  the run is written before APScheduler moves the trigger on, so a crash in
  between cannot lose the occurrence.

Misfires never drop work: `misfire_grace_time=None` runs late triggers however
late, and `coalesce=True` turns a downtime's worth of missed repeats into one.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.executors.base import BaseExecutor
from apscheduler.job import Job as ApsJob
from apscheduler.jobstores.base import JobLookupError
from apscheduler.jobstores.mongodb import MongoDBJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from .storage.mongo import SCHEDULER_JOBS, Mongo

log = logging.getLogger(__name__)
T = TypeVar("T")

WAKE_PREFIX = "wake:"
WAKE_RESOLUTION = 0.1  # seconds
REPEAT_PREFIX = "repeat:"
REPEAT_HANDOFF_TIMEOUT = 60.0


def fire(**_: Any) -> None:
    """The importable target APScheduler stores with each trigger.

    APScheduler persists a textual reference to a callable; `FireExecutor`
    handles every fire itself, so this is never called.
    """
    raise RuntimeError("mwapjobs triggers are handled by FireExecutor")


class FireExecutor(BaseExecutor):  # type: ignore[misc]
    """Hands each fire to the engine instead of calling the job's function."""

    def __init__(self, on_fire: Callable[[dict[str, Any], datetime], None]) -> None:
        super().__init__()
        self._on_fire = on_fire

    def submit_job(self, job: ApsJob, run_times: list[datetime]) -> None:
        # No instance counting: a fire is over when `_on_fire` returns.
        self._do_submit_job(job, run_times)

    def _do_submit_job(self, job: ApsJob, run_times: list[datetime]) -> None:
        self._on_fire(dict(job.kwargs), run_times[-1])


class CountingJobStore(MongoDBJobStore):  # type: ignore[misc]
    """`MongoDBJobStore` that counts its queries, so benchmarks can report round trips."""

    round_trips = 0

    def _count(self) -> None:
        self.round_trips += 1

    def lookup_job(self, job_id: str) -> Any:
        self._count()
        return super().lookup_job(job_id)

    def get_due_jobs(self, now: datetime) -> Any:
        self._count()
        return super().get_due_jobs(now)

    def get_next_run_time(self) -> Any:
        self._count()
        return super().get_next_run_time()

    def get_all_jobs(self) -> Any:
        self._count()
        return super().get_all_jobs()

    def add_job(self, job: ApsJob) -> None:
        self._count()
        super().add_job(job)

    def update_job(self, job: ApsJob) -> None:
        self._count()
        super().update_job(job)

    def remove_job(self, job_id: str) -> None:
        self._count()
        super().remove_job(job_id)

    def jobs_with_prefix(self, prefix: str) -> list[ApsJob]:
        """Jobs whose id starts with `prefix`, via an anchored (indexed) `_id` match.

        Listing repeat schedules must not unpickle every delayed trigger.
        `_get_jobs` is APScheduler 3's own helper; the dependency pins <4.
        """
        self._count()
        jobs: list[ApsJob] = self._get_jobs({"_id": {"$regex": "^" + _escape(prefix)}})
        return jobs


def _escape(text: str) -> str:
    return "".join("\\" + c if not c.isalnum() and c not in "-_:" else c for c in text)


@dataclass(frozen=True)
class Repeat:
    """A repeat schedule as operators see it."""

    queue: str
    job_id: str
    data: dict[str, Any]
    schedule: str
    timezone: str
    next_run_at: datetime | None


class WallClockCronTrigger(CronTrigger):  # type: ignore[misc]
    """A cron trigger that fires once per wall-clock time.

    When clocks go back, 02:30 happens twice; a job "at 02:30" must run once
    that night, not twice. Crons whose hour field is a wildcard ("every hour")
    keep firing in both hours, because there the interval is what counts.
    """

    def get_next_fire_time(self, previous: datetime | None, now: datetime) -> datetime | None:
        candidate: datetime | None = super().get_next_fire_time(previous, now)
        if previous is None or candidate is None or "*" in str(self.fields[5]):
            return candidate
        tz = self.timezone
        if candidate.astimezone(tz).replace(tzinfo=None) == previous.astimezone(tz).replace(
            tzinfo=None
        ):
            return self.get_next_fire_time(candidate, candidate)
        return candidate


_DAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def _crontab_days(field: str) -> str:
    """Standard crontab weekdays (0 or 7 = Sunday) as names APScheduler reads right.

    APScheduler 3 numbers weekdays from Monday = 0, so "1-5" would mean
    Tuesday to Saturday; names mean the same to both.
    """
    if field == "*":
        return field

    def day(token: str) -> int:
        token = token.lower()[:3]
        if token in _DAY_NAMES:
            return _DAY_NAMES.index(token)
        if not token.isdigit() or int(token) > 7:
            raise ValueError(f"bad day of week {token!r}")
        return int(token)

    days: set[int] = set()
    for item in field.split(","):
        span, _, step = item.partition("/")
        if span == "*":
            low, high = 0, 6
        elif "-" in span:
            first, last = span.split("-", 1)
            low, high = day(first), day(last)
        else:
            low = high = day(span)
            high = 6 if step else high
        days |= {d % 7 for d in range(low, high + 1, int(step) if step else 1)}
    return ",".join(_DAY_NAMES[d] for d in sorted(days))


def make_trigger(cron: str | None, every: float | None, timezone: str) -> BaseTrigger:
    """A cron (standard 5-field crontab) or interval trigger in `timezone`."""
    if (cron is None) == (every is None):
        raise ValueError("give exactly one of cron and every")
    try:
        tz = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {timezone!r}") from None
    if cron is not None:
        fields = cron.split()
        try:
            if len(fields) != 5:
                raise ValueError("expected 5 fields: minute hour day month day-of-week")
            minute, hour, day, month, weekdays = fields
            return WallClockCronTrigger(
                minute=minute, hour=hour, day=day, month=month,
                day_of_week=_crontab_days(weekdays), timezone=tz,
            )
        except ValueError as exc:
            raise ValueError(f"invalid cron expression {cron!r}: {exc}") from None
    assert every is not None
    if every <= 0:
        raise ValueError("every must be a positive number of seconds")
    return IntervalTrigger(seconds=every, timezone=tz)


class Scheduler:
    """APScheduler in its own thread, driven from the event loop without blocking it."""

    def __init__(
        self,
        mongo: Mongo,
        on_due: Callable[[], None],
        on_repeat: Callable[[str, str, dict[str, Any], datetime], Awaitable[None]],
    ) -> None:
        self._mongo = mongo
        self._on_due = on_due
        self._on_repeat = on_repeat
        self._io = ThreadPoolExecutor(1, thread_name_prefix="mwapjobs-scheduler-io")
        self._aps: BackgroundScheduler | None = None
        self._store: CountingJobStore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._armed: set[int] = set()  # wake-up slots with a trigger already

    @property
    def running(self) -> bool:
        return self._aps is not None and self._aps.running

    @property
    def round_trips(self) -> int:
        return self._store.round_trips if self._store else 0

    async def _in_thread(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._io, fn)

    async def start(self) -> None:
        """Start APScheduler; raises (e.g. `ServerSelectionTimeoutError`) if MongoDB is down."""
        self._loop = asyncio.get_running_loop()
        await self._in_thread(self._start_sync)

    def _start_sync(self) -> None:
        store = CountingJobStore(
            database=self._mongo.db_name,
            collection=SCHEDULER_JOBS,
            client=self._mongo.jobstore_client(),
        )
        aps = BackgroundScheduler(
            jobstores={"default": store},
            executors={"default": FireExecutor(self._fire)},
            job_defaults={"coalesce": True, "misfire_grace_time": None, "max_instances": 1},
            timezone=UTC,
        )
        try:
            aps.start()
        except BaseException:
            aps.shutdown(wait=False) if aps.running else None
            raise
        self._aps, self._store = aps, store

    async def shutdown(self) -> None:
        """Stop firing. Triggers stay in MongoDB and resume at the next start."""
        if self._aps is not None:
            aps, self._aps = self._aps, None
            await self._in_thread(lambda: aps.shutdown(wait=False))

    def close(self) -> None:
        self._io.shutdown(wait=False)

    def _fire(self, kwargs: dict[str, Any], run_time: datetime) -> None:
        """Runs on APScheduler's thread for every fire."""
        loop = self._loop
        assert loop is not None
        if kwargs.get("kind") == "repeat":
            handoff = self._on_repeat(kwargs["queue"], kwargs["job_id"], kwargs["data"], run_time)
            future = asyncio.run_coroutine_threadsafe(_awaited(handoff), loop)
            future.result(timeout=REPEAT_HANDOFF_TIMEOUT)
        else:
            loop.call_soon_threadsafe(self._on_due)

    def _require(self) -> BackgroundScheduler:
        if self._aps is None:
            raise RuntimeError("the scheduler is not running")
        return self._aps

    async def wake_at(self, when: datetime) -> None:
        """Make sure the engine is woken at `when`, rounded up to a tenth of a second.

        One trigger serves every run due in the same tenth of a second, so a
        burst of 10,000 runs due together costs one trigger, not 10,000. A
        wake-up with nothing left to promote (the run was promoted by hand or
        removed) is harmless, so triggers are never removed early.
        """
        aps = self._require()
        slot = math.ceil(when.timestamp() / WAKE_RESOLUTION)
        if slot in self._armed:
            return
        self._armed.add(slot)
        if len(self._armed) > 100_000:  # forget slots that have passed
            now_slot = datetime.now(UTC).timestamp() / WAKE_RESOLUTION
            self._armed = {s for s in self._armed if s >= now_slot}
        try:
            await self._in_thread(
                lambda: aps.add_job(
                    fire,
                    trigger=DateTrigger(
                        run_date=datetime.fromtimestamp(slot * WAKE_RESOLUTION, UTC),
                        timezone=UTC),
                    id=f"{WAKE_PREFIX}{slot}",
                    kwargs={"kind": "wake"},
                    replace_existing=True,
                )
            )
        except BaseException:
            self._armed.discard(slot)
            raise

    async def set_repeat(
        self, queue: str, job_id: str, data: dict[str, Any], *, cron: str | None = None,
        every: float | None = None, timezone: str = "UTC",
    ) -> Repeat:
        """Create or replace a repeat schedule; an identical one is left as it is, so a
        restart does not push an interval's next fire further out."""
        aps = self._require()
        trigger = make_trigger(cron, every, timezone)
        job_key = f"{REPEAT_PREFIX}{queue}:{job_id}"
        kwargs = {
            "kind": "repeat", "queue": queue, "job_id": job_id, "data": data,
            "schedule": cron if cron is not None else f"every {every:g}s", "timezone": timezone,
        }

        def upsert() -> ApsJob:
            existing = aps.get_job(job_key)
            if existing is not None and existing.kwargs == kwargs:
                return existing
            return aps.add_job(fire, trigger=trigger, id=job_key, kwargs=kwargs,
                               replace_existing=True)

        job = await self._in_thread(upsert)
        return _repeat_info(job)

    async def remove_repeat(self, queue: str, job_id: str) -> bool:
        aps = self._require()

        def remove() -> bool:
            try:
                aps.remove_job(f"{REPEAT_PREFIX}{queue}:{job_id}")
                return True
            except JobLookupError:
                return False

        return await self._in_thread(remove)

    async def repeats(self, queue: str | None = None) -> list[Repeat]:
        store = self._store
        if store is None or not self.running:
            raise RuntimeError("the scheduler is not running")
        prefix = REPEAT_PREFIX + (f"{queue}:" if queue else "")
        jobs = await self._in_thread(lambda: store.jobs_with_prefix(prefix))
        return [_repeat_info(job) for job in jobs]


async def _awaited(awaitable: Awaitable[T]) -> T:
    return await awaitable


def _repeat_info(job: ApsJob) -> Repeat:
    return Repeat(
        queue=job.kwargs["queue"],
        job_id=job.kwargs["job_id"],
        data=job.kwargs["data"],
        schedule=job.kwargs["schedule"],
        timezone=job.kwargs["timezone"],
        next_run_at=job.next_run_time,
    )
