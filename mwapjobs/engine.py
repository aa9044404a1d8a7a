"""The queue engine: turns run documents into handler calls, at least once.

How a job travels (see README, "How the engine works"):
1. `add` writes a run document, and that is all: a delayed run is noted on the
   due timer (`duetimer.DueTimer`), a waiting one wakes its queue. A repeat is an
   APScheduler trigger (`scheduler.Scheduler`); each fire writes a run.
2. One worker loop per queue claims runs that may start (waiting, or delayed and
   due) in batches, up to the queue's concurrency, under a lease that one loop
   renews for every run this process holds.
3. An attempt ends in an outcome (completed, failed, or delayed again for a retry
   with backoff, bounded by the run's deadline), written in batches by
   `outcomes.OutcomeWriter`, owner-checked, and retried while MongoDB is away.
4. A sweep takes back the runs of dead processes (`policy.stall_verdict` decides
   what a crash means for each), promotes due runs whose wake-up was missed, and
   re-reads which queues are paused. It also runs at start.
5. A run that was active at several crashes runs alone (`_isolation`), so a job that
   kills its process is found out without taking its neighbours down with it.

The guarantee is at-least-once: a handler may run again after a crash at the
wrong moment, so handlers must be idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from . import owners
from .config import EngineSettings
from .duetimer import DueTimer
from .leadership import Leadership
from .logs import secrets
from .outcomes import Finished, OutcomeWriter
from .policy import retry_time, stall_verdict
from .queues import (
    AndThen,
    Backoff,
    InvalidJobData,
    Job,
    PermanentError,
    Postpone,
    Queue,
    QueueRegistry,
    Retention,
    TransientError,
)
from .redaction import redact
from .scheduler import CHECK_SECONDS, Repeat, Scheduler
from .storage.leases import LeaseStore
from .storage.mongo import Mongo
from .storage.runs import (
    FINISHED,
    PENDING,
    THROUGHPUT_KEEP,
    Outcome,
    RunId,
    RunStore,
    State,
    new_run,
    parse_run_id,
)
from .supervisor import FailureLog, Supervisor
from .timeouts import TimeLimits, within
from .triggers import make_trigger

log = logging.getLogger(__name__)
COUNT_FLUSH_SECONDS = 1.0  # how often the finished counters in MongoDB catch up
WAIT_POLL = 1.0  # seconds between looks at a run another instance may be running

EventName = Literal["completed", "failed", "retrying", "postponed", "stalled"]
Listener = Callable[[EventName, dict[str, Any]], Awaitable[None] | None]
Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """MongoDB hands back naive UTC datetimes unless the client is tz-aware."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Added:
    """A run that `Engine.add` wrote (or found pending under the same job id)."""

    run_id: str
    state: State
    created: bool
    engine: Engine | None = field(default=None, repr=False, compare=False)

    async def settled(self, timeout: float) -> dict[str, Any] | None:
        """The run once it finished or was postponed, or as it is after `timeout` s
        (None if it is gone)."""
        assert self.engine is not None
        return await self.engine.wait_settled(self.run_id, timeout)


def postponed(run: dict[str, Any]) -> bool:
    """A run put back by its handler (`Postpone`), not finished: it waits for something
    outside (a provider's hold, say) that may last."""
    attempts = run.get("attempts") or []
    return (run.get("state") in ("delayed", "waiting") and bool(attempts)
            and attempts[-1].get("outcome") == "postponed")


def settled(run: dict[str, Any]) -> bool:
    """A run that will not move on by itself soon: finished, or postponed."""
    return run.get("state") in FINISHED or postponed(run)


def _result_summary(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return secrets.scrub(value[:2000])
    if isinstance(value, dict) and _plain_keys(value) and len(repr(value)) <= 4000:
        return value
    return secrets.scrub(repr(value)[:2000])


def _plain_keys(value: Any) -> bool:
    """No key anywhere inside that an update operator would read as an operator or a
    path (`$x`, `a.b`): a result is stored with `$set` and `$push`."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and not k.startswith("$") and "." not in k
                   and _plain_keys(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(_plain_keys(v) for v in value)
    return True


def _error_doc(exc: BaseException, permanent: bool) -> dict[str, Any]:
    message = str(exc) or type(exc).__name__
    doc: dict[str, Any] = {"message": secrets.scrub(message[:2000]),
                           "type": type(exc).__name__, "permanent": permanent}
    if isinstance(exc, TransientError) and exc.retry_after is not None:
        doc["retryAfter"] = exc.retry_after  # what the far side asked us to wait
    return doc


class Engine:
    """Queues on MongoDB with APScheduler as the clock of repeats. Several engines may
    share a database (each claims atomically); one per process is usual."""

    def __init__(
        self,
        mongo: Mongo,
        registry: QueueRegistry,
        settings: EngineSettings | None = None,
        *,
        clock: Clock = utcnow,
        signing_key: bytes | None = None,
    ) -> None:
        """`signing_key` signs the stored repeat triggers (`storage.jobstore`); without
        one, a key of this process alone is used, and the triggers are rebuilt at the
        next start."""
        self.mongo = mongo
        self.registry = registry
        self.settings = settings or EngineSettings()
        self.clock = clock
        self.runs = RunStore(mongo, self.settings.search_fields)
        self._ephemeral_key = signing_key is None
        self.scheduler = Scheduler(mongo, self._on_repeat, signing_key or os.urandom(32))
        self.owner = owners.process_owner()
        # Only the leader runs the clock of repeats; every instance works and serves.
        self.leadership = Leadership(LeaseStore(mongo), self.owner,
                                     self.settings.leader_lease, clock)
        self.leadership.on_change(self.scheduler.start_clock, self.scheduler.stop_clock)
        self._timer = DueTimer(self._wake_due, self.runs.due_after, clock)
        self._writer = OutcomeWriter(self.runs, self.owner, self._written)
        self._limits = TimeLimits()  # the handlers' timeouts
        self._tasks = Supervisor()
        self._accepting = False
        self._started = False
        self._paused: set[str] = set()
        self._pause_changes = 0  # so a sweep's stale read does not undo a pause made here
        self._handlers: dict[RunId, asyncio.Task[None]] = {}  # handlers running now
        self._leased: set[RunId] = set()  # runs we hold: handler running or outcome unwritten
        self._lost: set[RunId] = set()  # leases another process took over
        self._active_by_queue: dict[str, int] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._claiming: dict[str, asyncio.Lock] = {}  # a claim and the start of its runs
        self._claiming_isolated = asyncio.Lock()
        self._due_hint: dict[str, int] = {}  # queue -> runs the due timer saw fall due
        self._woken: set[str] = set()  # queues woken for another reason than the timer
        self._starved: set[str] = set()  # queues that may have more runs than slots
        self._isolating = False  # a run that must run alone is being started or runs
        self._isolation = asyncio.Event()  # such runs may be waiting
        self._idle = asyncio.Event()  # no handler runs
        self._idle.set()
        self._listeners: list[Listener] = []
        self._waiters: dict[RunId, set[asyncio.Future[None]]] = {}  # wait_settled
        self.retention_owner: str | None = None  # who deletes finished runs, if not us
        # Finished runs counted here since the last flush into the queues' counters, and
        # the same transitions by the minute they happened in (the throughput counters).
        self._count_deltas: Counter[tuple[str, State]] = Counter()
        self._minute_deltas: Counter[tuple[datetime, str, State]] = Counter()
        # A flush and a read of the counters, one at a time: a flush's deltas are on the
        # wire (in neither place) until it is acknowledged, and a read in between would
        # miss them (a count of 0 where 5,000 had finished).
        self._counters = asyncio.Lock()
        self._throughput_pruned: datetime | None = None

    # -- lifecycle ---------------------------------------------------------

    @property
    def running(self) -> bool:
        """Started, and its clock is alive (what readiness reports)."""
        return self._started and self.scheduler.healthy

    async def start(self) -> None:
        """Prepare the database, start the clock, recover, and start working.

        Raises if MongoDB is unreachable; the caller retries. A failed start
        leaves nothing running.
        """
        owners.LIVE.add(self.owner)
        try:
            await self.runs.ensure_indexes()
            for queue in self.registry:
                await self.runs.init_counts(queue.name)
            await self.scheduler.start()
            await self.sweep()
            self._isolating = await self.runs.has_isolated(self.registry.names())
        except BaseException:
            owners.LIVE.discard(self.owner)
            await self.scheduler.shutdown()
            raise
        self._accepting = self._started = True
        for queue in self.registry:
            self._wake[queue.name] = asyncio.Event()
            self._claiming[queue.name] = asyncio.Lock()
            self._active_by_queue.setdefault(queue.name, 0)
            self._tasks.keep(f"worker:{queue.name}", functools.partial(self._work, queue))
        if self._isolating:  # runs left from crashes go first, each alone
            self._isolation.set()
        self._timer.start()
        self._tasks.keep("outcomes", self._writer.run)
        self._tasks.keep("isolation", self._isolate)
        self._tasks.every("clock", CHECK_SECONDS, self.scheduler.check_clock,
                          message="could not restart the clock; retrying")
        lease = self.settings.lease_seconds
        self._tasks.every("lease-renewer", lease / 3, self._renew)
        self._tasks.every("sweeper", self.settings.sweep_interval, self.sweep,
                          max_backoff=max(30.0, self.settings.sweep_interval))
        self._tasks.every("retention", self.settings.retention_interval, self._retention_step)
        self._tasks.every("counters", COUNT_FLUSH_SECONDS, self._flush_counts)
        await self.leadership.step()  # lead at once if nobody does
        self._tasks.every("leadership", self.leadership.poll_every, self.leadership.tick)
        log.info("engine started", extra={"owner": self.owner, "queues": self.registry.names()})
        if self._ephemeral_key and not self.mongo.embedded:
            log.warning("repeat triggers are signed with a key of this process only: set "
                        "MWAPJOBS_SIGNING_KEY or ENCRYPTION_KEY, or they are rejected "
                        "(quarantined) and rebuilt at every start")

    async def stop(self, timeout: float) -> None:
        """Drain: stop claiming and firing, let running jobs finish for up to
        `timeout` seconds, write their outcomes, then hand the rest back to the queue
        for the next start."""
        if not self._started:
            return
        deadline = time.monotonic() + timeout
        self._accepting = False
        self.wake()
        await self.leadership.resign()  # another instance may lead at once
        await self.scheduler.shutdown()
        self._timer.stop()
        # A claim in flight returns runs that are leased to us: they start and drain
        # with the others (had they started after this point, unseen, the process would
        # exit under them and they would run again elsewhere).
        with contextlib.suppress(TimeoutError):
            await within(self._claims_done(), max(0.0, deadline - time.monotonic()))
        running = list(self._handlers.values())
        if running:
            log.info("waiting for running jobs", extra={"count": len(running),
                                                        "timeout": timeout})
            _done, pending = await asyncio.wait(running, timeout=timeout)
            unfinished = [rid for rid, task in self._handlers.items() if task in pending]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        else:
            unfinished = []
        if not await self._writer.flush(max(1.0, deadline - time.monotonic())):
            log.warning("shutdown: some run outcomes could not be written; those runs will "
                        "run again after their lease expires",
                        extra={"count": len(self._writer.run_ids())})
        if unfinished:
            try:
                released = await self.runs.release(unfinished, self.owner)
                log.warning("shutdown timeout: unfinished jobs returned to their queues",
                            extra={"count": released})
            except Exception as exc:
                log.warning("could not hand unfinished jobs back; they run again after "
                            "their lease expires", extra={"count": len(unfinished),
                                                          "error": str(exc)[:300]})
        await self._tasks.stop()
        with contextlib.suppress(Exception):  # lost if MongoDB is away: a few counts
            await self._flush_counts()
        self._finish_stop()

    async def kill(self) -> None:
        """Stop at once and write nothing, as SIGKILL would (for tests of crash recovery).
        Runs this engine held stay active in MongoDB until another engine takes them."""
        self._accepting = False
        self._timer.stop()
        handlers = list(self._handlers.values())
        for task in handlers:
            task.cancel()
        await self._tasks.stop()
        await self.leadership.abandon()  # the lease stays taken until it runs out
        await asyncio.gather(*handlers, return_exceptions=True)
        await self.scheduler.shutdown()
        self._finish_stop()

    def _claim_locks(self) -> list[asyncio.Lock]:
        """Every lock a claim holds until its runs have started, in one order."""
        return [*self._claiming.values(), self._claiming_isolated]

    async def _claims_done(self) -> None:
        """Wait for the claims in flight; once not accepting, no claim starts after."""
        for lock in self._claim_locks():
            async with lock:
                pass

    def _finish_stop(self) -> None:
        self._started = False
        owners.LIVE.discard(self.owner)
        self.scheduler.close()

    async def release_all(self) -> int:
        """Hand every run we hold back to its queue now, refunding the attempt (an
        operator's second signal: exiting now is a decision, not a crash)."""
        self._accepting = False
        return await self.runs.release(list(self._leased), self.owner)

    # -- events ----------------------------------------------------------------

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener(event, run)` on completed/failed/retrying/postponed/stalled;
        returns an unsubscribe function. A failing listener is logged and never affects
        a job."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    async def _emit(self, event: EventName, run: dict[str, Any]) -> None:
        for listener in list(self._listeners):
            try:
                outcome = listener(event, run)
                if outcome is not None:
                    await outcome
            except Exception:
                log.exception("event listener failed", extra={"event": event})

    # -- adding work -------------------------------------------------------------

    async def add(
        self,
        queue: str,
        data: dict[str, Any] | None = None,
        *,
        job_id: str | None = None,
        delay: float | None = None,
        run_at: datetime | None = None,
        priority: int | None = None,
        attempts: int | None = None,
        backoff: dict[str, Any] | Backoff | None = None,
        timeout: float | None = None,
        deadline: datetime | None = None,
        replace: bool = False,
        slot: str | None = None,
    ) -> Added:
        """Add one job. With `job_id`, a job that is already pending is not added twice;
        `replace=True` moves a pending, not yet started one to the new time and data.
        `slot` names a repeat occurrence: a second run for the same slot is never made.

        Raises UnknownQueueError, InvalidJobData (the job type refuses `data`) or
        ValueError (bad options)."""
        q = self.registry.get(queue)
        data = q.check_data({} if data is None else data)
        if delay is not None and run_at is not None:
            raise ValueError("give delay or run_at, not both")
        if attempts is not None and attempts < 1:
            raise ValueError("attempts must be at least 1")
        if isinstance(backoff, Backoff):
            backoff = backoff.__dict__
        options = q.options.override(priority=priority, attempts=attempts, backoff=backoff,
                                     timeout=timeout)
        now = self.clock()
        due = as_utc(run_at) if run_at else now + timedelta(seconds=max(0.0, delay or 0.0))
        run, created = await self.runs.add(
            queue, data, job_id=job_id, due=due, now=now, priority=options.priority,
            max_attempts=options.attempts, backoff=options.backoff_doc(),
            timeout=options.timeout, deadline=as_utc(deadline) if deadline else None,
            slot=slot, replace=replace)
        if created or replace or run["state"] == "waiting":
            self._announce(queue, run)
        return Added(str(run["_id"]), run["state"], created, self)

    async def move(self, queue: str, seen: dict[str, Any], data: dict[str, Any], *,
                   run_at: datetime, deadline: datetime | None) -> bool:
        """Give a pending run read earlier (`seen`, as `runs.pending_by_job` returns it) a
        new time and data, if it is still as it was read: not started, and not moved or
        replaced by anyone since (a run someone asked for meanwhile, due now, stays due
        now). Its priority is kept. True if it was moved."""
        data = self.registry.get(queue).check_data(data)
        due, now = as_utc(run_at), self.clock()
        state: State = "delayed" if due > now else "waiting"
        run = await self.runs.move_if_unchanged(seen, {
            "runAt": due, "data": data, "state": state,
            "deadline": as_utc(deadline) if deadline else None})
        if run is None:
            return False
        self._announce(queue, run)
        return True

    def _announce(self, queue: str, run: dict[str, Any]) -> None:
        """A run was written delayed or waiting: arm the due timer, or wake a worker."""
        if run["state"] == "delayed":
            self._timer.note(as_utc(run["runAt"]), queue)
        elif run["state"] == "waiting":
            self.wake(queue)

    async def promote_matching(self, queue: str, data: dict[str, Any], *,
                               postponed_only: bool = False) -> int:
        """Run now the delayed runs of `queue` whose data has these values (for example
        the refreshes of a provider whose hold just ended); returns how many."""
        self.registry.get(queue)
        promoted = await self.runs.promote_matching(queue, data, self.clock(),
                                                    postponed_only=postponed_only)
        if promoted:
            self.wake(queue)
        return promoted

    async def wait_settled(self, run_id: str, timeout: float) -> dict[str, Any] | None:
        """The run once it finished or was postponed (`settled`), or as it is after
        `timeout` s; None if there is no such run. Outcomes written here wake the wait at
        once; a run taken by another instance is seen within WAIT_POLL s.

        A run this instance settled is returned once its write was acknowledged here,
        not as soon as the stored state reads settled (a moment before): the counts
        (`counts`, stats, `/metrics`) include it by then."""
        oid = parse_run_id(run_id)
        if oid is None:
            return None
        deadline = time.monotonic() + timeout
        woken: asyncio.Future[None] | None = None
        try:
            while True:
                run = await self.runs.get(oid)
                left = deadline - time.monotonic()
                if run is None or left <= 0 or (settled(run) and oid not in self._leased):
                    return run
                woken = asyncio.get_running_loop().create_future()
                self._waiters.setdefault(oid, set()).add(woken)
                with contextlib.suppress(TimeoutError):
                    await within(woken, min(left, WAIT_POLL))
                self._waiters.get(oid, set()).discard(woken)
        finally:
            if woken is not None:
                waiting = self._waiters.get(oid)
                if waiting is not None:
                    waiting.discard(woken)
                    if not waiting:
                        del self._waiters[oid]

    async def cancel(self, queue: str, job_id: str) -> bool:
        """Drop the not-yet-started run of `job_id`; a running one finishes normally."""
        return await self.runs.delete_not_started(queue, job_id) is not None

    async def repeat(
        self,
        queue: str,
        data: dict[str, Any] | None = None,
        *,
        cron: str | None = None,
        every: float | None = None,
        timezone: str = "UTC",
        job_id: str | None = None,
    ) -> Repeat:
        """Create or replace the repeat schedule `job_id` (default: the queue's name).

        Re-adding with another cron, interval or data replaces the definition;
        each fire adds a run with that job id, so a run still pending from the
        previous fire makes the next one a no-op instead of a pile-up.
        """
        q = self.registry.get(queue)
        q.check_data(data or {})
        make_trigger(cron, every, timezone)  # a bad definition fails here, before any I/O
        return await self.scheduler.set_repeat(queue, job_id or queue, data or {}, cron=cron,
                                               every=every, timezone=timezone)

    async def remove_repeat(self, queue: str, job_id: str) -> bool:
        return await self.scheduler.remove_repeat(queue, job_id)

    def wake(self, queue: str | None = None) -> None:
        """Tell a queue's worker (or all) that there may be work."""
        for name, event in self._wake.items():
            if queue is None or name == queue:
                self._woken.add(name)
                event.set()

    def _wake_due(self, queues: dict[str, int]) -> None:
        """The due timer: these many runs of each queue fell due."""
        for name, count in queues.items():
            event = self._wake.get(name)
            if event is not None:
                self._due_hint[name] = self._due_hint.get(name, 0) + count
                event.set()

    async def _on_repeat(self, queue: str, job_id: str, data: dict[str, Any],
                         fire_time: datetime) -> None:
        """Write the run of a repeat fire (the clock thread waits for this and retries
        the fire if it raises)."""
        if queue not in self.registry:
            log.error("repeat fired for an unknown queue", extra={"queue": queue})
            return
        if not self.leadership.leading:  # lost the lease: the new leader fires it
            raise RuntimeError("this instance no longer leads; the fire is not written")
        fired = as_utc(fire_time).isoformat()
        slot = f"{queue}:{job_id}@{fired}"
        try:
            added = await self.add(queue, data, job_id=job_id, slot=slot)
        except InvalidJobData as exc:
            log.error("repeat fire refused: its data no longer fits the job type",
                      extra={"queue": queue, "jobId": job_id, "fireTime": fired,
                             "error": str(exc)})
            return
        if not added.created:
            log.info("repeat fire skipped: the previous run is still pending",
                     extra={"queue": queue, "jobId": job_id, "fireTime": fired,
                            "runId": added.run_id})

    # -- working ---------------------------------------------------------------

    async def _work(self, queue: Queue) -> None:
        """Claim and start runs of one queue while there are free slots."""
        wake = self._wake[queue.name]
        failures = FailureLog(log, "claim failed; retrying", queue=queue.name)
        while self._accepting:
            wake.clear()  # before looking: a wake() from now on is seen by the next wait
            free = queue.options.concurrency - self._active_by_queue[queue.name]
            if free <= 0 or queue.name in self._paused or self._isolating:
                self._starved.add(queue.name)  # a slot freed (or a resume) wakes us
                await self._wait(wake)
                continue
            # Woken by the due timer for one run and nothing else: claim just that one,
            # in one round trip. Otherwise a batch, and if it came back full there may be
            # more, so a slot freed later wakes us (`_starved`).
            hint = self._due_hint.pop(queue.name, 0)
            hinted = hint == 1 and queue.name not in self._woken
            self._woken.discard(queue.name)
            wanted = 1 if hinted else min(free, self.settings.claim_batch)
            async with self._claiming[queue.name]:
                if queue.name in self._paused or self._isolating or not self._accepting:
                    continue
                try:
                    claimed = await self.runs.claim(queue.name, wanted, self.owner,
                                                    self.clock(), self.settings.lease_seconds)
                except Exception as exc:
                    failures.failed(exc)
                    await asyncio.sleep(min(2.0 ** failures.failures, 30.0))
                    continue
                failures.succeeded()
                for run in claimed:
                    self._start_run(queue, run)
            if not hinted and len(claimed) == wanted:
                self._starved.add(queue.name)
                continue
            self._starved.discard(queue.name)
            await self._wait(wake)

    async def _wait(self, event: asyncio.Event) -> None:
        with contextlib.suppress(TimeoutError):
            await within(event.wait(), self.settings.sweep_interval)

    def _start_run(self, queue: Queue, run: dict[str, Any]) -> asyncio.Task[None]:
        run_id = run["_id"]
        self._active_by_queue[queue.name] += 1
        self._leased.add(run_id)
        self._idle.clear()
        task = asyncio.ensure_future(self._execute(queue, run))
        self._handlers[run_id] = task

        def done(_: asyncio.Task[None]) -> None:
            self._handlers.pop(run_id, None)
            if task.cancelled():  # shutdown or kill: the run is released, not finished
                self._leased.discard(run_id)
            self._active_by_queue[queue.name] -= 1
            if not self._handlers:
                self._idle.set()
            if queue.name in self._starved:  # runs may wait for this slot
                self.wake(queue.name)

        task.add_done_callback(done)
        return task

    async def _execute(self, queue: Queue, run: dict[str, Any]) -> None:
        job = Job(
            run_id=str(run["_id"]), queue=queue.name, job_id=run.get("jobId"),
            data=run.get("data") or {}, attempt=run["attemptsMade"],
            max_attempts=run["maxAttempts"], created_at=as_utc(run["createdAt"]),
            deadline=as_utc(run["deadline"]) if run.get("deadline") else None,
        )
        started_at = self.clock()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("run started", extra={"runId": job.run_id, "queue": job.queue,
                                            "jobId": job.job_id, "attempt": job.attempt})
        t0 = time.monotonic()
        error: BaseException | None = None
        result: Any = None
        limit = run.get("timeout") or queue.options.timeout
        timed_out, cancels = False, 0
        task = asyncio.current_task()
        try:
            queue.check_data(run.get("data"))
            self._limits.begin(task, limit)
            try:
                result = await queue.handler(job)
            finally:
                timed_out, cancels = self._limits.end(task)
            if isinstance(result, AndThen):
                queue.check_data(result.data)  # the next run's, before it is written
        except asyncio.CancelledError:
            if not timed_out or cancels:
                raise  # shutdown: `stop` hands the run back
            error = TimeoutError(f"timed out after {limit}s")
        except InvalidJobData as exc:
            error = PermanentError(f"the job's data does not fit its type: {exc}")
        except Exception as exc:
            error = exc
        duration_ms = round((time.monotonic() - t0) * 1000, 3)
        self._writer.submit(self._conclude(job, run, started_at, duration_ms, result, error))

    def _conclude(self, job: Job, run: dict[str, Any], started_at: datetime,
                  duration_ms: float, result: Any, error: BaseException | None) -> Finished:
        """What one attempt comes to: the fields to write, and the event once written."""
        now = self.clock()
        attempt: dict[str, Any] = {"attempt": len(run.get("attempts") or []) + 1,
                                   "startedAt": started_at, "finishedAt": now,
                                   "durationMs": duration_ms}
        summary = {"runId": job.run_id, "queue": job.queue, "jobId": job.job_id,
                   "attempt": job.attempt, "maxAttempts": job.max_attempts, "data": job.data}

        def done(fields: dict[str, Any], event: str, payload: dict[str, Any],
                 due: datetime | None = None, follow: dict[str, Any] | None = None,
                 ) -> Finished:
            outcome = Outcome(run["_id"], {**fields, "isolate": False}, attempt, follow)
            return Finished(outcome, job.queue, event, {**summary, **payload}, due)

        if error is None:
            attempt["outcome"] = "completed"
            follow = None
            if isinstance(result, AndThen):
                follow, result = self._next_run(job.queue, result, now), result.result
            summary_result = _result_summary(result)
            return done({"state": "completed", "finishedAt": now, "durationMs": duration_ms,
                         "result": summary_result, "error": None},
                        "completed", {"result": summary_result, "durationMs": duration_ms},
                        follow=follow)
        if isinstance(error, Postpone):
            until = now + timedelta(seconds=error.delay)
            attempt.update(outcome="postponed", reason=secrets.scrub(str(error)[:300]))
            return done({"state": "delayed", "runAt": until,
                         "attemptsMade": run["attemptsMade"] - 1},
                        "postponed", {"until": until, "reason": attempt["reason"]}, until)
        permanent = isinstance(error, PermanentError)
        err = _error_doc(error, permanent)
        attempt["error"] = err
        retry_at = None if permanent else retry_time(
            attempt=job.attempt, max_attempts=job.max_attempts,
            backoff=Backoff(**run.get("backoff", {})), now=now,
            retry_after=error.retry_after if isinstance(error, TransientError) else None,
            deadline=job.deadline)
        if retry_at is None:
            attempt["outcome"] = "failed"
            if job.deadline and not permanent and job.attempt < job.max_attempts:
                err = {**err, "deadlineExceeded": True}
            return done({"state": "failed", "finishedAt": now, "durationMs": duration_ms,
                         "error": err}, "failed", {"error": err, "durationMs": duration_ms})
        attempt["outcome"] = "retrying"
        return done({"state": "delayed", "runAt": retry_at, "error": err}, "retrying",
                    {"error": err, "retryAt": retry_at, "durationMs": duration_ms}, retry_at)

    def _next_run(self, queue: str, then: AndThen, now: datetime) -> dict[str, Any]:
        """The run a handler asked for with its result (`AndThen`), as `add` makes it."""
        options = self.registry.get(queue).options
        return new_run(queue, then.data, job_id=then.job_id, due=as_utc(then.run_at), now=now,
                       priority=options.priority, max_attempts=options.attempts,
                       backoff=options.backoff_doc(), timeout=options.timeout,
                       deadline=as_utc(then.deadline) if then.deadline else None)

    async def _written(self, batch: list[Finished], written: set[RunId]) -> None:
        """After a batch of outcomes was written: wake the timer, log, emit events."""
        finished = Counter((item.queue, item.outcome.fields["state"]) for item in batch
                           if item.outcome.finishing and item.outcome.run_id in written)
        for (queue, state), n in finished.items():  # (once per batch: a clock read each)
            self.count_finished(queue, state, n)
        for item in batch:
            run_id = item.outcome.run_id
            if item.outcome.follow is not None:  # inserted with the batch (or moved)
                self._announce(item.queue, item.outcome.follow)
            self._leased.discard(run_id)
            self._lost.discard(run_id)
            payload = item.payload
            if run_id not in written:
                log.warning("lost the lease before recording the outcome; another process "
                            "took the run over", extra={"runId": payload["runId"],
                                                        "queue": item.queue})
                continue
            if item.due is not None:
                self._timer.note(item.due, item.queue)
            for waiter in self._waiters.pop(run_id, ()):
                if not waiter.done():
                    waiter.set_result(None)
            if item.event == "completed":
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("run completed", extra={"runId": payload["runId"],
                                                      "queue": item.queue,
                                                      "durationMs": payload["durationMs"]})
            else:
                logged = {**payload, "data": redact(payload["data"])}
                if item.event == "failed":
                    log.warning("job failed", extra=logged)
                elif item.event == "retrying":
                    log.info("job will be retried", extra=logged)
                else:
                    log.info("job postponed", extra=logged)
            await self._emit(item.event, payload)  # type: ignore[arg-type]

    async def _renew(self) -> None:
        """Renew the lease of every run we hold, in one query."""
        ids = [i for i in self._leased if i not in self._lost]
        if not ids:
            return
        until = self.clock() + timedelta(seconds=self.settings.lease_seconds)
        renewed = await self.runs.renew(ids, self.owner, until)
        if renewed == len(ids):
            return
        still = [i for i in ids if i in self._leased]  # some finished while we renewed
        if len(still) <= renewed:
            return
        lost = await self.runs.taken_over(still, self.owner)
        if lost:
            self._lost |= lost
            log.warning("another process took over runs this one still holds (their "
                        "leases had expired); their outcomes will not be recorded here",
                        extra={"runIds": [str(i) for i in sorted(lost)]})

    # -- crashes -------------------------------------------------------------------

    async def sweep(self) -> None:
        """Take back the runs of dead processes, promote due runs whose wake-up was
        missed, and re-read which queues are paused (another instance may have paused
        one). Runs every `engine.sweep_interval` and at start."""
        now = self.clock()
        await self._recover(now)
        if await self.runs.promote_due(now):
            self.wake()
        changes = self._pause_changes
        paused = await self.runs.paused_queues()
        if changes == self._pause_changes:  # not paused or resumed here meanwhile
            resumed = self._paused - paused
            self._paused = paused
            for queue in resumed:
                self.wake(queue)
        if self._started and not self._isolating and \
                await self.runs.has_isolated(self.registry.names()):
            self._isolation.set()

    async def _recover(self, now: datetime) -> None:
        """Requeue (or fail) every active run of every process that is gone: one whose
        leases expired, or one of this host that no longer runs."""
        dead = await self.runs.expired_owners(now)
        if self.owner in dead:
            await self._release_orphans(now)
        dead |= {o for o in await self.runs.active_owners() if owners.owner_is_dead(o, self.owner)}
        dead.discard(self.owner)
        if not dead:
            return
        runs = await self.runs.active_of(dead)
        peers = Counter(run.get("leaseOwner") for run in runs)
        isolate = False
        for run in runs:
            verdict = stall_verdict(crashes=int(run.get("crashes") or 0),
                                    stalled=int(run.get("stalledCount") or 0),
                                    alone=peers[run.get("leaseOwner")] == 1,
                                    limit=self.settings.stalled_limit)
            fields: dict[str, Any] = {"state": verdict.state, "crashes": verdict.crashes,
                                      "stalledCount": verdict.stalled,
                                      "isolate": verdict.isolate}
            if verdict.state == "failed":
                fields |= {"finishedAt": now, "error": {
                    "message": f"the process running this job died {verdict.stalled} times "
                               f"while it ran alone (limit {self.settings.stalled_limit}): "
                               "the job itself kills it",
                    "type": "Stalled", "permanent": True}}
            else:
                fields["runAt"] = now
            if not await self.runs.recover(run, fields, refund=verdict.state == "waiting",
                                           finished=verdict.state == "failed"):
                continue
            isolate |= verdict.isolate
            if verdict.state == "failed":
                self.count_finished(run["queue"], "failed", 1)
            log.warning("stalled run recovered", extra={
                "runId": str(run["_id"]), "queue": run["queue"], "movedTo": verdict.state,
                "deadOwner": run.get("leaseOwner"), "crashes": verdict.crashes,
                "stalledCount": verdict.stalled, "isolate": verdict.isolate})
            await self._emit("stalled", {"runId": str(run["_id"]), "queue": run["queue"],
                                         "jobId": run.get("jobId"), "movedTo": verdict.state})
        if isolate:
            self._isolation.set()
        self.wake()

    async def _release_orphans(self, now: datetime) -> None:
        """Hand back the runs leased to this process that it does not hold: MongoDB
        carried out a claim whose answer never came (a timeout, a frozen server), so no
        handler started them, nothing renews them, and no other process takes a live
        owner's runs. Claims wait meanwhile, so none in flight is among them."""
        async with contextlib.AsyncExitStack() as claims:
            for lock in self._claim_locks():
                await claims.enter_async_context(lock)
            ids = [i for i in await self.runs.expired_of(self.owner, now)
                   if i not in self._leased]
            released = await self.runs.release(ids, self.owner)
        if released:
            log.warning("runs claimed for this process but never started (the claim's "
                        "answer was lost) were handed back", extra={"count": released})
            self.wake()

    async def _isolate(self) -> None:
        """Run, one at a time and alone in this process, the runs that were active at
        several crashes: while one starts and for its first lease period, no other run
        starts here, so if it kills the process it is the one to blame."""
        while True:
            await self._isolation.wait()
            self._isolation.clear()
            try:
                while self._accepting:
                    self._isolating = True
                    with contextlib.suppress(TimeoutError):  # long runs do not hold it up
                        await within(self._idle.wait(), self.settings.lease_seconds)
                    queues = [q for q in self.registry.names() if q not in self._paused]
                    async with self._claiming_isolated:
                        if not self._accepting:
                            break
                        run = await self.runs.claim_isolated(queues, self.owner, self.clock(),
                                                             self.settings.lease_seconds)
                        if run is None:
                            break
                        log.info("running a run alone: it was active when its process died",
                                 extra={"runId": str(run["_id"]), "queue": run["queue"],
                                        "crashes": run.get("crashes")})
                        task = self._start_run(self.registry.get(run["queue"]), run)
                    await asyncio.wait({task}, timeout=self.settings.lease_seconds)
            finally:
                self._isolating = False
                self.wake()

    # -- retention -------------------------------------------------------------------

    def hand_over_retention(self, owner: str) -> None:
        """From now on `owner` deletes finished runs past their retention (after archiving
        them), so the engine's own retention loop stops deleting: a run it deleted every
        `retention_interval` could never be archived. `apply_retention` still works when
        called, and `count_finished` keeps the counters right for whoever deletes."""
        self.retention_owner = owner
        log.info("finished runs are kept until archived", extra={"retentionBy": owner})

    async def _retention_step(self) -> None:
        if self.retention_owner is None:
            await self.apply_retention()

    async def apply_retention(self) -> int:
        deleted = 0
        now = self.clock()
        for queue in self.registry:
            rules: tuple[tuple[State, Retention], ...] = (
                ("completed", queue.options.keep_completed),
                ("failed", queue.options.keep_failed),
            )
            for state, keep in rules:
                gone = 0
                if keep.age is not None:
                    gone += await self.runs.delete_finished_before(
                        queue.name, state, now - timedelta(seconds=keep.age))
                if keep.count is not None:
                    gone += await self.runs.delete_beyond(queue.name, state, keep.count)
                self.count_finished(queue.name, state, -gone)
                deleted += gone
        return deleted

    # -- counts ------------------------------------------------------------------------

    def count_finished(self, queue: str, state: str, n: int) -> None:
        """Runs of `queue` entered (n > 0) or left (n < 0) finished state `state`; the
        counters in MongoDB follow within COUNT_FLUSH_SECONDS. Entering is also counted
        for the minute it happens in (throughput); leaving (a retry, retention) is not:
        a minute's counts say what finished then."""
        if n and state in FINISHED:
            self._count_deltas[(queue, state)] += n
            if n > 0:
                minute = as_utc(self.clock()).replace(second=0, microsecond=0)
                self._minute_deltas[(minute, queue, state)] += n

    async def _flush_counts(self) -> None:
        """Write the counters gathered since the last flush: one update per queue that
        changed, plus one per minute touched for the throughput (usually one), on the
        counter task's own beat rather than on each completion's write."""
        async with self._counters:
            deltas, self._count_deltas = self._count_deltas, Counter()
            try:
                await self.runs.bump(dict(deltas))
            except BaseException:
                self._count_deltas.update(deltas)  # kept for the next flush
                raise
            minutes, self._minute_deltas = self._minute_deltas, Counter()
            try:
                await self.runs.bump_minutes(dict(minutes))
            except BaseException:
                self._minute_deltas.update(minutes)
                raise
        now = as_utc(self.clock())
        if self._throughput_pruned is None or now - self._throughput_pruned > timedelta(hours=1):
            self._throughput_pruned = now  # TTL does it on a server; this bounds the rest
            await self.runs.prune_throughput(now - THROUGHPUT_KEEP)

    async def throughput(self, since: datetime) -> dict[datetime, dict[str, dict[str, int]]]:
        """minute → queue → {completed, failed} from `since`, as written by every instance,
        with what this one has not flushed yet."""
        async with self._counters:
            found = await self.runs.throughput(since)
            unflushed = list(self._minute_deltas.items())
        for (minute, queue, state), n in unflushed:
            if minute >= since:
                counts = found.setdefault(minute, {}).setdefault(
                    queue, dict.fromkeys(FINISHED, 0))
                counts[state] = counts.get(state, 0) + n
        return found

    async def _finished(self) -> tuple[dict[str, dict[str, int]], Counter[tuple[str, State]]]:
        """The finished counters as written, and what this instance has not flushed yet:
        read together, so that a flush on its way is counted once, not zero times."""
        async with self._counters:
            return await self.runs.finished_counts(), Counter(self._count_deltas)

    async def counts(self, queue: str) -> dict[State, int]:
        """Runs of `queue` by state. Pending states are counted (their number is the
        work at hand, not history); finished ones come from the counters, so this costs
        the same with a thousand finished runs or a million."""
        pending = await asyncio.gather(*(self.runs.count(queue, s) for s in PENDING))
        written, unflushed = await self._finished()
        finished = written.get(queue, {})
        out: dict[State, int] = dict(zip(PENDING, pending, strict=True))
        for state in FINISHED:
            out[state] = max(0, finished.get(state, 0) + unflushed[(queue, state)])
        return out

    async def count(self, queue: str, state: State) -> int:
        """`counts(queue)[state]` alone: one indexed count for a pending state, the
        counters for a finished one (a page of history then counts no pending runs)."""
        if state not in FINISHED:
            return await self.runs.count(queue, state)
        written, unflushed = await self._finished()
        return max(0, written.get(queue, {}).get(state, 0) + unflushed[(queue, state)])

    async def all_counts(self) -> dict[str, dict[State, int]]:
        """`counts` of every queue, with one read of the counters."""
        names = self.registry.names()
        pending = await asyncio.gather(*(self.runs.count(q, s) for q in names
                                         for s in PENDING))
        finished, unflushed = await self._finished()
        out: dict[str, dict[State, int]] = {}
        for i, queue in enumerate(names):
            counts: dict[State, int] = dict(zip(
                PENDING, pending[i * len(PENDING):(i + 1) * len(PENDING)], strict=True))
            for state in FINISHED:
                counts[state] = max(0, finished.get(queue, {}).get(state, 0)
                                    + unflushed[(queue, state)])
            out[queue] = counts
        return out

    # -- pause / resume (used by operations) ----------------------------------------

    async def set_paused(self, queue: str, paused: bool) -> None:
        """Pause or resume a queue. Once a pause returns, no run of the queue starts here
        (a claim in flight is waited for); other instances follow at their next sweep."""
        self.registry.get(queue)
        await self.runs.set_paused(queue, paused)
        self._pause_changes += 1
        (self._paused.add if paused else self._paused.discard)(queue)
        lock = self._claiming.get(queue)
        if paused and lock is not None:
            async with lock:
                pass
            await asyncio.sleep(0)  # the runs claimed just before take their first step now
        if not paused:
            self.wake(queue)

    def is_paused(self, queue: str) -> bool:
        return queue in self._paused

    @property
    def active_count(self) -> int:
        return len(self._handlers)

