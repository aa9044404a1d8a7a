"""APScheduler 3 as the clock of repeats: it persists their triggers and says when they fire.

APScheduler's `MongoDBJobStore` speaks synchronous pymongo, so APScheduler runs as a
`BackgroundScheduler` in its own thread, and every call we make into it goes through
one dedicated I/O thread (`_in_thread`): the event loop never runs a pymongo call.
Delayed runs need no trigger at all (the engine's `DueTimer` wakes it); only repeats
(cron or interval) live here.

A fire is one repeat occurrence. `_ClockThread` replaces APScheduler's processing pass
so that the clock keeps the promise "nothing silently lost":
- a fire is handed to the event loop, which writes the run (`Engine._on_repeat`);
  only once that write succeeded is the trigger moved on. If it fails (MongoDB down),
  the occurrence is tried again after `RETRY_SECONDS`, never skipped;
- any job-store error (an `AutoReconnect` mid-pass, a `JobLookupError` because another
  instance already moved the trigger) is logged and retried; the thread never dies of it;
- every run written for a fire carries the fire time as its `slot`, unique in the runs
  collection, so a fire retried after a half-finished pass, or processed by a second
  instance on the same database, never becomes a second run.
A check (`check_clock`, every CHECK_SECONDS on the loop) restarts a clock whose thread
died or is stuck in one pass; readiness says so until then.

Only the leading instance runs the clock (`start_clock`, from `leadership.py`); every
instance can set, remove and list repeats: without a clock, through its own job store
(`_store_job`). The clock looks at the store at least every MAX_WAIT seconds, so a
repeat set on another instance fires at most that late.

Misfires never drop work: a late trigger fires however late, and a downtime's worth of
missed occurrences is coalesced into one fire (the latest).

A repeat can be paused (`pause_repeat`): its trigger stays, with no next fire time, in
the shared job store, so every instance sees the pause and the leader's clock skips it;
declaring the repeat again (every start does) keeps it paused, and resuming computes its
next fire from now. The clock moves a trigger on only if it still fires when it did as
read (`JobStore.update_job_if`), so a pause landing during a fire is not undone.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
import types
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from apscheduler.job import Job as ApsJob
from apscheduler.jobstores.base import ConflictingIdError, JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import STATE_PAUSED, STATE_STOPPED
from apscheduler.triggers.base import BaseTrigger

from .storage.jobstore import JobStore, with_prefix
from .storage.mongo import Mongo
from .storage.names import SCHEDULER_JOBS
from .triggers import make_trigger

log = logging.getLogger(__name__)
T = TypeVar("T")

REPEAT_PREFIX = "repeat:"
LEGACY_WAKE_PREFIX = "wake:"  # triggers of delayed runs, written by versions before 0.2
HANDOFF_TIMEOUT = 60.0  # seconds the clock thread waits for a fire's run to be written
RETRY_SECONDS = 5.0  # after a store error or a fire that could not be written
STUCK_SECONDS = 2 * HANDOFF_TIMEOUT + 30.0  # one pass taking longer than this is stuck
CHECK_SECONDS = 5.0  # how often the supervisor looks at the thread
MAX_WAIT = 10.0  # the clock's longest sleep: it sees triggers other instances wrote

RepeatHandler = Callable[[str, str, dict[str, Any], datetime], Awaitable[None]]


def fire(**_: Any) -> None:
    """The importable callable APScheduler stores with each trigger: it insists on one,
    and triggers written by earlier versions name this one.

    `_ClockThread` handles every fire itself, so APScheduler never calls it.
    """
    raise RuntimeError("mwapjobs triggers are fired by the clock thread, not called")


@dataclass(frozen=True)
class Repeat:
    """A repeat schedule as operators see it."""

    queue: str
    job_id: str
    data: dict[str, Any]
    schedule: str
    timezone: str
    next_run_at: datetime | None

    @property
    def paused(self) -> bool:
        return self.next_run_at is None


class _ClockThread(BackgroundScheduler):  # type: ignore[misc]
    """A BackgroundScheduler whose thread survives store errors and never drops a fire."""

    def __init__(self, fire: Callable[[ApsJob, datetime], None], **options: Any) -> None:
        super().__init__(**options)
        self._fire = fire
        self.busy_since: float | None = None  # monotonic start of the pass in progress
        self.passes = 0
        self._last_error_log = 0.0

    def _main_loop(self) -> None:
        wait: float | None = threading.TIMEOUT_MAX
        while self.state != STATE_STOPPED:
            self._event.wait(wait)
            self._event.clear()
            if self.state == STATE_STOPPED:  # APScheduler's own loop makes one more pass
                break
            wait = self._guarded_pass()

    def _guarded_pass(self) -> float | None:
        self.busy_since = time.monotonic()
        try:
            return self._process_jobs()
        except Exception as exc:
            if self.state != STATE_STOPPED:
                self._log_error("clock pass failed; retrying", exc)
            return RETRY_SECONDS
        finally:
            self.busy_since = None
            self.passes += 1

    def _log_error(self, message: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._last_error_log >= 10.0:  # one line per 10 s while an outage lasts
            self._last_error_log = now
            log.warning(message, extra={"error": f"{type(exc).__name__}: {exc}"[:300],
                                        "retryIn": RETRY_SECONDS})

    def _process_jobs(self) -> float:
        """One pass: fire what is due, move each trigger on once its run is written."""
        if self.state == STATE_PAUSED:
            return MAX_WAIT
        now = datetime.now(self.timezone)
        retry = False
        with self._jobstores_lock:
            store = self._jobstores["default"]
            for job in store.get_due_jobs(now):
                run_times = job._get_run_times(now)
                if not run_times:
                    continue
                fire_time = run_times[-1]  # a downtime's worth of fires coalesces into one
                read_as = job.next_run_time
                try:
                    self._fire(job, fire_time)
                except Exception as exc:
                    retry = True
                    self._log_error("repeat fire not recorded yet; it will be retried", exc)
                    continue  # the trigger stays where it is: the occurrence is kept
                following = job.trigger.get_next_fire_time(fire_time, now)
                try:
                    if following is not None:
                        job._modify(next_run_time=following)
                        # Not if it was paused, replaced or moved meanwhile.
                        store.update_job_if(job, read_as)
                    else:
                        store.remove_job(job.id)
                except JobLookupError:
                    pass  # another instance removed or replaced it meanwhile
            next_run = store.get_next_run_time()
        if retry:  # the fire that failed is still due: try again after a pause, not at once
            return RETRY_SECONDS
        if next_run is None:
            return MAX_WAIT
        wait: float = (next_run - now).total_seconds()
        return min(MAX_WAIT, max(0.0, wait))

    def stop(self, timeout: float) -> bool:
        """Stop the thread, then close the store (never the other way round: the thread
        would use a closed client). False if the thread did not end within `timeout`."""
        self.state = STATE_STOPPED
        self._event.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        alive = thread is not None and thread.is_alive()
        if not alive:
            for store in self._jobstores.values():
                store.shutdown()
        return not alive


class Scheduler:
    """The clock thread, driven from the event loop without blocking it."""

    def __init__(self, mongo: Mongo, on_repeat: RepeatHandler, signing_key: bytes) -> None:
        self._mongo = mongo
        self._on_repeat = on_repeat
        self._signing_key = signing_key
        self._io = ThreadPoolExecutor(1, thread_name_prefix="mwapjobs-scheduler-io")
        self._writer: JobStore | None = None  # every instance's: set, remove, list
        self._clock: _ClockThread | None = None  # the leader's
        self._store: JobStore | None = None  # the clock's own
        self._leads = False  # what leadership said last
        # The clock should run (what `healthy` and `check_clock` hold it to): set once a
        # start ended, so the moment a new leader spends starting its clock does not read
        # as a dead clock (readiness went 200, 503, 200 right after start-up).
        self._wanted = False
        # Starting, stopping and restarting the clock, one at a time: each waits on the
        # I/O thread, and a check during a slow start would otherwise start a second
        # clock (two threads firing every occurrence, one of them never stopped).
        self._clock_lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._round_trips = 0  # of stores replaced by a restart
        self.restarts = 0

    @property
    def running(self) -> bool:
        """Started (repeats can be set and listed) and not shut down."""
        return self._writer is not None

    @property
    def clock_running(self) -> bool:
        return self._clock is not None

    @property
    def healthy(self) -> bool:
        """The clock's thread, if this instance should run one, is alive and not stuck."""
        if not self._wanted:
            return self.running
        clock = self._clock
        if clock is None or clock.state == STATE_STOPPED:
            return False
        thread = clock._thread
        busy = clock.busy_since
        return bool(thread is not None and thread.is_alive()
                    and (busy is None or time.monotonic() - busy < STUCK_SECONDS))

    @property
    def round_trips(self) -> int:
        return self._round_trips + sum(s.round_trips for s in (self._writer, self._store) if s)

    async def _in_thread(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._io, fn)

    def _new_store(self) -> JobStore:
        return JobStore(key=self._signing_key, database=self._mongo.db_name,
                        collection=SCHEDULER_JOBS, client=self._mongo.jobstore_client())

    async def start(self) -> None:
        """Open this instance's job store; raises (e.g. `ServerSelectionTimeoutError`) if
        MongoDB is down. The clock starts only when this instance leads."""
        self._loop = asyncio.get_running_loop()

        def open_store() -> JobStore:
            store = self._new_store()
            # Delayed runs no longer have triggers; those of older versions go.
            store.collection.delete_many({"_id": {"$regex": f"^{LEGACY_WAKE_PREFIX}"}})
            return store

        self._writer = await self._in_thread(open_store)

    async def start_clock(self) -> None:
        """This instance leads: run the clock (retried by `check_clock` if it fails)."""
        self._leads = True
        async with self._clock_lock:
            if not self._leads:  # stopped meanwhile
                return
            try:
                if self._clock is None:
                    self._clock, self._store = await self._in_thread(self._start_sync)
            finally:  # a failed start is a clock that should run: `check_clock` retries
                self._wanted = self._leads

    async def stop_clock(self) -> None:
        """This instance no longer leads: stop firing (the triggers stay)."""
        self._leads = False
        async with self._clock_lock:
            self._wanted = False
            clock, self._clock = self._clock, None
            if clock is not None:
                if self._store is not None:
                    self._round_trips += self._store.round_trips
                    self._store = None
                await self._in_thread(lambda: clock.stop(HANDOFF_TIMEOUT + 5))

    def _start_sync(self) -> tuple[_ClockThread, JobStore]:
        store = self._new_store()
        clock = _ClockThread(self._fire, jobstores={"default": store},
                             job_defaults={"coalesce": True, "misfire_grace_time": None,
                                           "max_instances": 1},
                             timezone=UTC)
        try:
            clock.start()
        except BaseException:
            clock.stop(5.0)
            raise
        return clock, store

    async def shutdown(self) -> None:
        """Stop firing and close the job store. Triggers stay in MongoDB."""
        await self.stop_clock()
        writer, self._writer = self._writer, None
        if writer is not None:
            self._round_trips += writer.round_trips
            await self._in_thread(writer.shutdown)

    def close(self) -> None:
        self._io.shutdown(wait=False)

    async def check_clock(self) -> None:
        """Start the clock if this instance leads and it is not running, restart it if its
        thread died or is stuck (the engine's supervisor runs this every CHECK_SECONDS; a
        failed start raises, and is tried again)."""
        if not self._wanted or self.healthy:
            return
        async with self._clock_lock:
            if self._wanted and not self.healthy:  # still so once a start or stop ended
                await self._restart_clock()

    async def _restart_clock(self) -> None:
        old = self._clock
        if old is None:
            self._clock, self._store = await self._in_thread(self._start_sync)
            return
        log.error("the clock thread died or is stuck; restarting it",
                  extra={"aliveThread": bool(old._thread and old._thread.is_alive()),
                         "busySeconds": round(time.monotonic() - old.busy_since, 1)
                         if old.busy_since else None})
        old.state = STATE_STOPPED
        old._event.set()
        clock, store = await self._in_thread(self._start_sync)
        if self._store is not None:
            self._round_trips += self._store.round_trips
        if self._clock is old:  # not shut down meanwhile
            self._clock, self._store = clock, store
            self.restarts += 1
        else:
            await self._in_thread(functools.partial(clock.stop, 5.0))
        # The old thread exits when its pass ends; closing its client ends a stuck one.
        threading.Thread(target=old.stop, args=(HANDOFF_TIMEOUT,), daemon=True,
                         name="mwapjobs-clock-reaper").start()

    def _fire(self, job: ApsJob, fire_time: datetime) -> None:
        """On the clock thread, for every fire: write its run; raise if that failed."""
        kwargs = job.kwargs
        if kwargs.get("kind") != "repeat":
            log.warning("ignoring a trigger mwapjobs did not make", extra={"id": job.id})
            return
        loop = self._loop
        assert loop is not None
        handoff = self._on_repeat(kwargs["queue"], kwargs["job_id"], kwargs["data"], fire_time)
        asyncio.run_coroutine_threadsafe(_awaited(handoff), loop).result(HANDOFF_TIMEOUT)

    def _require(self) -> JobStore:
        if self._writer is None:
            raise RuntimeError("the scheduler is not running")
        return self._writer

    async def set_repeat(
        self, queue: str, job_id: str, data: dict[str, Any], *, cron: str | None = None,
        every: float | None = None, timezone: str = "UTC",
    ) -> Repeat:
        """Create or replace a repeat schedule; an identical one is left as it is, so a
        restart does not push an interval's next fire further out."""
        writer = self._require()
        trigger = make_trigger(cron, every, timezone)
        job_key = f"{REPEAT_PREFIX}{queue}:{job_id}"
        kwargs = {
            "kind": "repeat", "queue": queue, "job_id": job_id, "data": data,
            "schedule": cron if cron is not None else f"every {every:g}s", "timezone": timezone,
        }
        clock = self._clock

        def upsert() -> ApsJob:
            if clock is not None:  # the leader: APScheduler writes it and wakes its clock
                existing = clock.get_job(job_key)
                if existing is not None and existing.kwargs == kwargs:
                    return existing
                paused = existing is not None and existing.next_run_time is None
                return clock.add_job(fire, trigger=trigger, id=job_key, kwargs=kwargs,
                                     replace_existing=True,
                                     **({"next_run_time": None} if paused else {}))
            return _store_job(writer, job_key, trigger, kwargs)

        return _repeat_info(await self._in_thread(upsert))

    async def remove_repeat(self, queue: str, job_id: str) -> bool:
        writer = self._require()
        key = f"{REPEAT_PREFIX}{queue}:{job_id}"
        clock = self._clock

        def remove() -> bool:
            try:
                (clock or writer).remove_job(key)
                return True
            except JobLookupError:
                return False

        return await self._in_thread(remove)

    async def pause_repeat(self, queue: str, job_id: str, paused: bool) -> Repeat | None:
        """Pause (no next fire) or resume (the next fire from now) a repeat, in the shared
        job store; None if there is no such repeat. The leader's clock is woken so that a
        resumed repeat due soon is not waited for MAX_WAIT."""
        writer = self._require()
        key = f"{REPEAT_PREFIX}{queue}:{job_id}"
        clock = self._clock

        def change() -> ApsJob | None:
            for _ in range(3):
                job = writer.lookup_job(key)
                if job is None:
                    return None
                before = job.next_run_time
                if (before is None) == paused:
                    return job  # already so
                job.next_run_time = (None if paused else
                                     job.trigger.get_next_fire_time(None, datetime.now(UTC)))
                if writer.update_job_if(job, before):
                    if clock is not None:
                        clock.wakeup()
                    return job
            raise RuntimeError("the repeat kept changing meanwhile; try again")

        job = await self._in_thread(change)
        return None if job is None else _repeat_info(job)

    async def repeats(self, queue: str | None = None) -> list[Repeat]:
        writer = self._require()
        prefix = REPEAT_PREFIX + (f"{queue}:" if queue else "")
        return [_repeat_info(job) for job in writer.readable(await with_prefix(self._mongo,
                                                                              prefix))]


_UTC_ONLY = types.SimpleNamespace(timezone=UTC)  # all a Job asks of its scheduler here


def _store_job(store: JobStore, job_key: str, trigger: BaseTrigger,
               kwargs: dict[str, Any]) -> ApsJob:
    """Write a repeat's trigger without a running clock (on an instance that does not
    lead), as APScheduler's `add_job(replace_existing=True)` would; the leader's clock
    reads it at its next pass."""
    existing = store.lookup_job(job_key)
    if existing is not None and existing.kwargs == kwargs:
        return existing
    paused = existing is not None and existing.next_run_time is None
    job = ApsJob(_UTC_ONLY, id=job_key, func=fire, trigger=trigger, executor="default", args=(),
                 kwargs=kwargs, name=job_key, misfire_grace_time=None, coalesce=True,
                 max_instances=1,
                 next_run_time=None if paused else trigger.get_next_fire_time(
                     None, datetime.now(UTC)))
    try:
        store.add_job(job)
    except ConflictingIdError:
        store.update_job(job)
    return job


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


__all__ = ["REPEAT_PREFIX", "Repeat", "Scheduler", "make_trigger"]
