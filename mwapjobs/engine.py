"""The queue engine: turns run documents into handler calls, at least once.

How a job travels (see README, "How the engine works"):
1. `add` writes a run document first. A delayed run also gets an APScheduler
   trigger; a repeat is only a trigger, and each fire writes a run.
2. When a trigger fires, due delayed runs are promoted to waiting in one query.
3. One worker loop per queue claims waiting runs in batches, up to the queue's
   concurrency, under a lease that one loop renews for every active run.
4. An attempt ends in one conditional write: completed, failed, or delayed
   again for a retry with backoff (bounded by the run's deadline, if any).
5. A sweep requeues runs whose lease expired (their process died) and
   promotes due runs whose trigger was lost; it also runs at start, so
   nothing waits for a fire that will never come.

The guarantee is at-least-once: a handler may run again after a crash at the
wrong moment, so handlers must be idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from bson import ObjectId

from .config import EngineSettings
from .logs import secrets
from .queues import (
    Backoff,
    Job,
    PermanentError,
    Postpone,
    Queue,
    QueueRegistry,
    Retention,
    TransientError,
)
from .scheduler import Repeat, Scheduler, make_trigger
from .storage.mongo import Mongo
from .storage.runs import RunStore, State

log = logging.getLogger(__name__)

EventName = Literal["completed", "failed", "retrying", "stalled"]
Listener = Callable[[EventName, dict[str, Any]], Awaitable[None] | None]
Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """MongoDB hands back naive UTC datetimes unless the client is tz-aware."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Added:
    run_id: str
    state: State
    created: bool


def _result_summary(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return secrets.scrub(value[:2000])
    if isinstance(value, dict) and len(repr(value)) <= 4000:
        return value
    return secrets.scrub(repr(value)[:2000])


def _error_doc(exc: BaseException, permanent: bool) -> dict[str, Any]:
    message = str(exc) or type(exc).__name__
    doc: dict[str, Any] = {"message": secrets.scrub(message[:2000]),
                           "type": type(exc).__name__, "permanent": permanent}
    if isinstance(exc, TransientError) and exc.retry_after is not None:
        doc["retryAfter"] = exc.retry_after  # what the far side asked us to wait
    return doc


class Engine:
    """Queues on MongoDB with APScheduler as the clock. One per process and database."""

    def __init__(
        self,
        mongo: Mongo,
        registry: QueueRegistry,
        settings: EngineSettings | None = None,
        *,
        clock: Clock = utcnow,
    ) -> None:
        self.mongo = mongo
        self.registry = registry
        self.settings = settings or EngineSettings()
        self.clock = clock
        self.runs = RunStore(mongo)
        self.scheduler = Scheduler(mongo, self._on_due, self._on_repeat)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._accepting = False
        self._started = False
        self._paused: set[str] = set()
        self._active: dict[ObjectId, asyncio.Task[None]] = {}
        self._active_by_queue: dict[str, int] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._due = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self._listeners: list[Listener] = []

    # -- lifecycle ---------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._started and self.scheduler.running

    async def start(self) -> None:
        """Prepare the database, start the clock, recover, and start working.

        Raises if MongoDB is unreachable; the caller retries. A failed start
        leaves nothing running.
        """
        try:
            await self.runs.ensure_indexes()
            self._paused = await self.runs.paused_queues()
            await self.scheduler.start()
            await self._sweep()
        except BaseException:
            await self.scheduler.shutdown()
            raise
        self._accepting = self._started = True
        for queue in self.registry:
            self._wake[queue.name] = asyncio.Event()
            self._active_by_queue.setdefault(queue.name, 0)
            self._spawn(self._work(queue), f"worker:{queue.name}")
        self._spawn(self._promoter(), "promoter")
        self._spawn(self._renewer(), "lease-renewer")
        self._spawn(self._sweeper(), "sweeper")
        self._spawn(self._retention(), "retention")
        log.info("engine started", extra={"owner": self.owner, "queues": self.registry.names()})

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        self._loops.append(asyncio.ensure_future(coro))
        self._loops[-1].set_name(f"mwapjobs:{name}")

    async def stop(self, timeout: float) -> None:
        """Drain: stop claiming and firing, let running jobs finish for up to
        `timeout` seconds, then hand the rest back to the queue for the next start."""
        self._accepting = False
        for event in self._wake.values():
            event.set()
        await self.scheduler.shutdown()
        running = list(self._active.values())
        if running:
            log.info("waiting for running jobs", extra={"count": len(running),
                                                        "timeout": timeout})
            _done, pending = await asyncio.wait(running, timeout=timeout)
            if pending:
                unfinished = [rid for rid, task in self._active.items() if task in pending]
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                released = await self.runs.release(unfinished, self.owner)
                log.warning("shutdown timeout: unfinished jobs returned to their queues",
                            extra={"count": released})
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops.clear()
        self._started = False
        self.scheduler.close()

    # -- events ----------------------------------------------------------------

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener(event, run)` on completed/failed/retrying/stalled; returns an
        unsubscribe function. A failing listener is logged and never affects a job."""
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
    ) -> Added:
        """Add one job. With `job_id`, a job that is already pending is not added twice;
        `replace=True` moves a pending, not yet started one to the new time and data."""
        q = self.registry.get(queue)
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
        state: State = "delayed" if due > now else "waiting"
        doc: dict[str, Any] = {
            "_id": ObjectId(), "queue": queue, "jobId": job_id, "data": data or {},
            "state": state, "priority": options.priority, "runAt": due,
            "attemptsMade": 0, "maxAttempts": options.attempts,
            "backoff": options.backoff_doc(), "timeout": options.timeout,
            "deadline": as_utc(deadline) if deadline else None, "createdAt": now,
            "attempts": [],
        }
        if job_id is not None:
            doc["key"] = f"{queue}:{job_id}"
        run, created = await self.runs.insert(doc)
        if not created and replace and (run["runAt"] != due or run["data"] != doc["data"]):
            updated = await self.runs.replace_pending(
                doc["key"], {"runAt": due, "data": doc["data"], "state": state,
                             "priority": options.priority, "deadline": doc["deadline"]}
            )
            if updated is not None:
                run = updated
        if run["state"] == "delayed" and (created or replace):
            await self._wake_at(as_utc(run["runAt"]))
        elif run["state"] == "waiting":
            self.wake(queue)
        return Added(str(run["_id"]), run["state"], created)

    async def cancel(self, queue: str, job_id: str) -> bool:
        """Drop the not-yet-started run of `job_id`; a running one finishes normally."""
        return await self.runs.delete_not_started(f"{queue}:{job_id}") is not None

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
        self.registry.get(queue)
        make_trigger(cron, every, timezone)  # a bad definition fails here, before any I/O
        return await self.scheduler.set_repeat(queue, job_id or queue, data or {}, cron=cron,
                                               every=every, timezone=timezone)

    async def remove_repeat(self, queue: str, job_id: str) -> bool:
        return await self.scheduler.remove_repeat(queue, job_id)

    def wake(self, queue: str | None = None) -> None:
        """Tell a queue's worker (or all) that there may be work."""
        for name, event in self._wake.items():
            if queue is None or name == queue:
                event.set()

    async def _wake_at(self, run_at: datetime) -> None:
        if not self.scheduler.running:
            return  # the sweep at start promotes it when due
        try:
            await self.scheduler.wake_at(run_at)
        except Exception:
            log.warning("could not set a trigger; the sweep will promote the run when due",
                        exc_info=True, extra={"runAt": run_at})

    # -- fires from the scheduler thread (delivered on the loop) -------------------

    def _on_due(self) -> None:
        self._due.set()

    async def _on_repeat(self, queue: str, job_id: str, data: dict[str, Any],
                         fire_time: datetime) -> None:
        """Write the run for a repeat fire. The scheduler thread waits for this."""
        if queue not in self.registry:
            log.error("repeat fired for an unknown queue", extra={"queue": queue})
            return
        added = await self.add(queue, data, job_id=job_id)
        if not added.created:
            log.info("repeat fire skipped: the previous run is still pending",
                     extra={"queue": queue, "jobId": job_id, "runId": added.run_id})

    # -- the loops -------------------------------------------------------------

    async def _work(self, queue: Queue) -> None:
        """Claim and start runs of one queue while there are free slots."""
        wake = self._wake[queue.name]
        failures = 0
        while self._accepting:
            free = queue.options.concurrency - self._active_by_queue[queue.name]
            if free <= 0 or queue.name in self._paused:
                await self._wait(wake)
                continue
            wake.clear()
            try:
                claimed = await self.runs.claim(
                    queue.name, min(free, self.settings.claim_batch), self.owner,
                    self.clock(), self.settings.lease_seconds,
                )
                failures = 0
            except Exception as exc:
                failures += 1
                pause = min(2.0 ** failures, 30.0)
                log.warning("claim failed; retrying", extra={"queue": queue.name,
                            "error": str(exc), "retryIn": pause})
                await asyncio.sleep(pause)
                continue
            if not self._accepting:  # stopped while claiming: give them back
                await self.runs.release([r["_id"] for r in claimed], self.owner)
                return
            for run in claimed:
                self._start_run(queue, run)
            if len(claimed) < min(free, self.settings.claim_batch):
                await self._wait(wake)

    async def _wait(self, event: asyncio.Event) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout=self.settings.sweep_interval)

    def _start_run(self, queue: Queue, run: dict[str, Any]) -> None:
        self._active_by_queue[queue.name] += 1
        task = asyncio.ensure_future(self._execute(queue, run))
        self._active[run["_id"]] = task

        def done(_: asyncio.Task[None]) -> None:
            self._active.pop(run["_id"], None)
            self._active_by_queue[queue.name] -= 1
            self._wake[queue.name].set()

        task.add_done_callback(done)

    async def _execute(self, queue: Queue, run: dict[str, Any]) -> None:
        job = Job(
            run_id=str(run["_id"]), queue=queue.name, job_id=run.get("jobId"),
            data=run.get("data") or {}, attempt=run["attemptsMade"],
            max_attempts=run["maxAttempts"], created_at=as_utc(run["createdAt"]),
            deadline=as_utc(run["deadline"]) if run.get("deadline") else None,
        )
        started_at = self.clock()
        log.debug("run started", extra={"runId": job.run_id, "queue": job.queue,
                                        "jobId": job.job_id, "attempt": job.attempt})
        t0 = time.monotonic()
        error: BaseException | None = None
        result: Any = None
        try:
            async with asyncio.timeout(run.get("timeout") or queue.options.timeout):
                result = await queue.handler(job)
        except asyncio.CancelledError:
            raise  # shutdown: `stop` hands the run back
        except TimeoutError as exc:
            error = TimeoutError(f"timed out after {run.get('timeout')}s") if not str(exc) else exc
        except Exception as exc:
            error = exc
        duration_ms = round((time.monotonic() - t0) * 1000, 3)
        try:
            await self._record(job, run, started_at, duration_ms, result, error)
        except Exception:
            # The lease will expire and the sweep will requeue the run: at least once.
            log.exception("could not record the outcome of a run", extra={"runId": job.run_id})

    async def _record(self, job: Job, run: dict[str, Any], started_at: datetime,
                      duration_ms: float, result: Any, error: BaseException | None) -> None:
        now = self.clock()
        attempt: dict[str, Any] = {"attempt": job.attempt, "startedAt": started_at,
                                   "finishedAt": now, "durationMs": duration_ms}
        summary = {"runId": job.run_id, "queue": job.queue, "jobId": job.job_id,
                   "attempt": job.attempt, "maxAttempts": job.max_attempts, "data": job.data}
        if error is None:
            attempt["outcome"] = "completed"
            fields = {"finishedAt": now, "durationMs": duration_ms,
                      "result": _result_summary(result), "error": None}
            if await self.runs.finish(run["_id"], self.owner, "completed", fields, attempt):
                log.debug("run completed", extra={"runId": job.run_id, "queue": job.queue,
                                                  "durationMs": duration_ms})
                await self._emit("completed", {**summary, "result": fields["result"],
                                               "durationMs": duration_ms})
            else:
                log.warning("lost the lease before completing", extra={"runId": job.run_id})
            return
        if isinstance(error, Postpone):
            retry_at = now + timedelta(seconds=error.delay)
            attempt.update(outcome="postponed", reason=secrets.scrub(str(error)[:300]))
            if await self.runs.postpone(run["_id"], self.owner, retry_at, attempt):
                await self._wake_at(retry_at)
                log.info("job postponed", extra={**summary, "data": None,
                                                 "until": retry_at.isoformat(),
                                                 "reason": attempt["reason"]})
            return
        permanent = isinstance(error, PermanentError)
        err = _error_doc(error, permanent)
        attempt["error"] = err
        retry_at = None if permanent else self._retry_time(job, run, error, now)
        if retry_at is None:
            attempt["outcome"] = "failed"
            fields = {"finishedAt": now, "durationMs": duration_ms, "error": err}
            if job.deadline and not permanent and job.attempt < job.max_attempts:
                fields["error"] = {**err, "deadlineExceeded": True}
            if await self.runs.finish(run["_id"], self.owner, "failed", fields, attempt):
                log.warning("job failed", extra={**summary, "data": None, "error": err})
                await self._emit("failed", {**summary, "error": fields["error"],
                                            "durationMs": duration_ms})
            return
        attempt["outcome"] = "retrying"
        if await self.runs.reschedule(run["_id"], self.owner, retry_at, attempt, err):
            await self._wake_at(retry_at)
            log.info("job will be retried", extra={**summary, "data": None,
                                                   "retryAt": retry_at, "error": err})
            await self._emit("retrying", {**summary, "error": err, "retryAt": retry_at,
                                          "durationMs": duration_ms})

    def _retry_time(self, job: Job, run: dict[str, Any], error: BaseException,
                    now: datetime) -> datetime | None:
        """When to try again, or None: attempts used up, or the deadline would pass first."""
        if job.attempt >= job.max_attempts:
            return None
        backoff = Backoff(**run.get("backoff", {}))
        delay = backoff.delay_for(job.attempt)
        if isinstance(error, TransientError) and error.retry_after is not None:
            delay = max(delay, error.retry_after)
        retry_at = now + timedelta(seconds=delay)
        if job.deadline is not None and retry_at >= job.deadline:
            return None
        return retry_at

    async def _promoter(self) -> None:
        """Promote due delayed runs whenever a trigger fires (many fires, one query)."""
        while True:
            await self._due.wait()
            self._due.clear()
            try:
                if await self.runs.promote_due(self.clock()):
                    self.wake()
            except Exception as exc:
                log.warning("promoting due runs failed; the sweep will retry",
                            extra={"error": str(exc)})

    async def _renewer(self) -> None:
        """Renew the lease of every active run, in one query, every third of a lease."""
        lease = self.settings.lease_seconds
        while True:
            await asyncio.sleep(lease / 3)
            ids = list(self._active)
            if not ids:
                continue
            try:
                renewed = await self.runs.renew(ids, self.owner,
                                                self.clock() + timedelta(seconds=lease))
                if renewed < len(ids):
                    log.warning("some active runs are no longer ours",
                                extra={"expected": len(ids), "renewed": renewed})
            except Exception as exc:
                log.warning("lease renewal failed", extra={"error": str(exc)})

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_interval)
            try:
                await self._sweep()
            except Exception as exc:
                log.warning("sweep failed", extra={"error": str(exc)})

    async def _sweep(self) -> None:
        """Requeue runs whose lease expired and promote due runs whose trigger is gone."""
        now = self.clock()
        for run in await self.runs.expired_leases(now, list(self._active)):
            state = await self.runs.recover_stalled(run, self.settings.stalled_limit, now)
            if state is None:
                continue
            log.warning("stalled run recovered", extra={"runId": str(run["_id"]),
                        "queue": run["queue"], "movedTo": state})
            await self._emit("stalled", {"runId": str(run["_id"]), "queue": run["queue"],
                                         "jobId": run.get("jobId"), "movedTo": state})
        if await self.runs.promote_due(now):
            self.wake()

    async def _retention(self) -> None:
        """Trim finished runs to each queue's keep_completed / keep_failed limits."""
        while True:
            await asyncio.sleep(self.settings.retention_interval)
            try:
                await self.apply_retention()
            except Exception as exc:
                log.warning("retention failed", extra={"error": str(exc)})

    async def apply_retention(self) -> int:
        deleted = 0
        now = self.clock()
        for queue in self.registry:
            rules: tuple[tuple[State, Retention], ...] = (
                ("completed", queue.options.keep_completed),
                ("failed", queue.options.keep_failed),
            )
            for state, keep in rules:
                if keep.age is not None:
                    deleted += await self.runs.delete_finished_before(
                        queue.name, state, now - timedelta(seconds=keep.age))
                if keep.count is not None:
                    deleted += await self.runs.delete_beyond(queue.name, state, keep.count)
        return deleted

    # -- pause / resume (used by operations) ----------------------------------------

    async def set_paused(self, queue: str, paused: bool) -> None:
        self.registry.get(queue)
        await self.runs.set_paused(queue, paused)
        (self._paused.add if paused else self._paused.discard)(queue)
        if not paused:
            self.wake(queue)

    def is_paused(self, queue: str) -> bool:
        return queue in self._paused

    @property
    def active_count(self) -> int:
        return len(self._active)
