"""What an operator can do to queues and runs: the Python API under the HTTP admin API.

Every action is one conditional write on the run, so an action racing the
engine (retrying a run that a worker just picked up, say) either applies to
the state the operator saw or reports a conflict; it never half-applies.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from .engine import Engine
from .redaction import REDACTED, redact
from .scheduler import Repeat
from .storage.runs import (
    FINISHED,
    STATES,
    JobIdTaken,
    RunSearch,
    State,
    parse_run_id,
)

MAX_PAGE_SIZE = 200
MAX_THROUGHPUT_MINUTES = 1440  # what the per-minute counters are read for: a day
MAX_BULK = 10_000  # runs one bulk call changes at most; the answer says if more are left


class NotFoundError(LookupError):
    pass


class ConflictError(RuntimeError):
    pass


def run_view(doc: dict[str, Any]) -> dict[str, Any]:
    """A run as the API and dashboard show it: stable names, secrets masked
    (see `mwapjobs.redaction`). Its id is `runId`, as everywhere else (the engine's
    events, `add()`, the API's paths)."""
    return {
        "runId": str(doc["_id"]),
        "queue": doc["queue"],
        "jobId": doc.get("jobId"),
        "state": doc["state"],
        "data": redact(doc.get("data") or {}),
        "priority": doc.get("priority", 0),
        "runAt": doc.get("runAt"),
        "createdAt": doc.get("createdAt"),
        "startedAt": doc.get("startedAt"),
        "finishedAt": doc.get("finishedAt"),
        "durationMs": doc.get("durationMs"),
        "attemptsMade": doc.get("attemptsMade", 0),
        "maxAttempts": doc.get("maxAttempts"),
        "deadline": doc.get("deadline"),
        "stalledCount": doc.get("stalledCount", 0),
        "result": redact(doc.get("result")),
        "error": doc.get("error"),
        "attempts": doc.get("attempts", []),
    }


def repeat_view(repeat: Repeat, last: dict[str, Any] | None = None) -> dict[str, Any]:
    """A repeat as the API shows it; `lastRun` is the newest run of its job id (a fire,
    or one run by hand: `fired` says which), None before the first."""
    last_run = None if last is None else {
        "runId": str(last["_id"]), "state": last.get("state"),
        "createdAt": last.get("createdAt"), "finishedAt": last.get("finishedAt"),
        "fired": last.get("slot") is not None}
    return {
        "queue": repeat.queue,
        "jobId": repeat.job_id,
        "schedule": repeat.schedule,
        "timezone": repeat.timezone,
        "nextRunAt": repeat.next_run_at,
        "paused": repeat.paused,
        "lastRun": last_run,
        "data": redact(repeat.data),
    }


class Operations:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.runs = engine.runs

    def _queue(self, name: str) -> str:
        if name not in self.engine.registry:
            raise NotFoundError(f"no queue named {name!r}")
        return name

    async def stats(self) -> dict[str, dict[str, Any]]:
        """Counts by state for every queue, each an indexed count."""
        result: dict[str, dict[str, Any]] = {}
        for name, by_state in (await self.engine.all_counts()).items():
            paused = self.engine.is_paused(name)
            result[name] = {
                "waiting": 0 if paused else by_state["waiting"],
                "active": by_state["active"],
                "delayed": by_state["delayed"],
                "completed": by_state["completed"],
                "failed": by_state["failed"],
                "paused": by_state["waiting"] if paused else 0,
                "isPaused": paused,
            }
        return result

    async def list_runs(self, queue: str, state: State, page: int = 1,
                        page_size: int = 20) -> dict[str, Any]:
        self._queue(queue)
        if state not in STATES:
            raise ValueError(f"state must be one of {', '.join(STATES)}")
        if page < 1 or not 1 <= page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page must be >= 1 and pageSize between 1 and {MAX_PAGE_SIZE}")
        skip, now = (page - 1) * page_size, self.engine.clock()
        if state in FINISHED:  # the counters first: they tell the page when it is complete
            total = await self._count(queue, state)
            docs = await self.runs.page(queue, state, skip, page_size, now=now, total=total)
        else:
            docs, total = await asyncio.gather(
                self.runs.page(queue, state, skip, page_size, now=now),
                self._count(queue, state))
        return {"items": [run_view(d) for d in docs], "page": page, "pageSize": page_size,
                "total": total}

    async def search(self, search: RunSearch, page: int = 1,
                     page_size: int = 20) -> dict[str, Any]:
        """Runs by job id or data field, in every state or one, in one queue or all."""
        if search.queue is not None:
            self._queue(search.queue)
        if page < 1 or not 1 <= page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page must be >= 1 and pageSize between 1 and {MAX_PAGE_SIZE}")
        docs, total = await self.runs.search(search, (page - 1) * page_size, page_size)
        return {"items": [run_view(d) for d in docs], "page": page, "pageSize": page_size,
                "total": total}

    # -- bulk actions: a count first (what the operator confirms), then the action ------

    async def failed_summary(self, queue: str, error_type: str | None) -> dict[str, Any]:
        """How many failed runs a bulk retry would take now, by error type, and `asOf`:
        pass it back to `retry_failed` so that runs failing after the count are left."""
        self._queue(queue)
        now = self.engine.clock()
        by_type = await self.runs.failed_by_type(queue, now)
        count = sum(by_type.values()) if error_type is None else by_type.get(error_type, 0)
        return {"queue": queue, "errorType": error_type, "count": count, "asOf": now,
                "byErrorType": by_type}

    async def retry_failed(self, queue: str, error_type: str | None,
                           as_of: datetime | None) -> dict[str, Any]:
        """Retry every failed run of `queue` (of `error_type`) that had failed by `as_of`,
        in bounded batches; each update is conditional on the run still being failed.
        A run whose job id is pending again (or is a second failed run of the same job id)
        is skipped: retrying it would make two pending runs of one job."""
        self._queue(queue)
        result = await self.runs.retry_failed(queue, error_type, as_of or self.engine.clock(),
                                              self.engine.clock(), MAX_BULK)
        self.engine.count_finished(queue, "failed", -result["retried"])
        if result["retried"]:
            self.engine.wake(queue)
        return {"queue": queue, "errorType": error_type, **result}

    async def delayed_summary(self, queue: str) -> dict[str, Any]:
        self._queue(queue)
        now = self.engine.clock()
        return {"queue": queue, "count": await self.runs.count(queue, "delayed"), "asOf": now}

    async def promote_delayed(self, queue: str, as_of: datetime | None) -> dict[str, Any]:
        """Make every delayed run of `queue` added by `as_of` waiting now, in bounded
        batches, each conditional on the run still being delayed."""
        self._queue(queue)
        now = self.engine.clock()
        result = await self.runs.promote_all(queue, as_of or now, now, MAX_BULK)
        if result["promoted"]:
            self.engine.wake(queue)
        return {"queue": queue, **result}

    async def throughput(self, minutes: int = 1440, queue: str | None = None) -> dict[str, Any]:
        """Runs completed and failed per minute for the last `minutes` minutes (the current
        one included, oldest first), per queue: dense series, a zero where none finished."""
        if not 1 <= minutes <= MAX_THROUGHPUT_MINUTES:
            raise ValueError(f"minutes must be between 1 and {MAX_THROUGHPUT_MINUTES}")
        names = [self._queue(queue)] if queue is not None else self.engine.registry.names()
        now = self.engine.clock().astimezone(UTC).replace(second=0, microsecond=0)
        start = now - timedelta(minutes=minutes - 1)
        found = await self.engine.throughput(start)
        series = {name: {state: [0] * minutes for state in FINISHED} for name in names}
        for minute, by_queue in found.items():
            index = int((minute - start).total_seconds() // 60)
            if not 0 <= index < minutes:
                continue
            for name, counts in by_queue.items():
                if name in series:
                    for state in FINISHED:
                        series[name][state][index] += counts.get(state, 0)
        return {"from": start, "to": now, "minutes": minutes, "stepSeconds": 60,
                "queues": {name: {**values, "total": {s: sum(values[s]) for s in FINISHED}}
                           for name, values in series.items()}}

    async def _count(self, queue: str, state: State) -> int:
        return await self.engine.count(queue, state)

    async def _get(self, run_id: str) -> dict[str, Any]:
        oid = parse_run_id(run_id)
        doc = await self.runs.get(oid) if oid else None
        if doc is None:
            raise NotFoundError(f"no run with id {run_id!r}")
        return doc

    async def get_run(self, run_id: str) -> dict[str, Any]:
        return run_view(await self._get(run_id))

    async def retry(self, run_id: str) -> dict[str, Any]:
        """A failed run gets a fresh set of attempts, now."""
        doc = await self._get(run_id)
        if doc["state"] != "failed":
            raise ConflictError(f"only failed runs can be retried (this one is {doc['state']})")
        updated = await self._requeue(doc, ("failed",), {"attemptsMade": 0, "error": None,
                                                         "finishedAt": None, "stalledCount": 0})
        self.engine.count_finished(doc["queue"], "failed", -1)
        return run_view(updated)

    async def promote(self, run_id: str) -> dict[str, Any]:
        """A delayed run becomes waiting now."""
        doc = await self._get(run_id)
        if doc["state"] != "delayed":
            raise ConflictError(f"only delayed runs can be promoted (this one is {doc['state']})")
        return run_view(await self._requeue(doc, ("delayed",), {}))

    async def _requeue(self, doc: dict[str, Any], from_states: tuple[State, ...],
                       reset: dict[str, Any]) -> dict[str, Any]:
        key = f"{doc['queue']}:{doc['jobId']}" if doc.get("jobId") is not None else None
        try:
            updated = await self.runs.requeue(doc["_id"], from_states, key,
                                              self.engine.clock(), reset)
        except JobIdTaken:
            raise ConflictError(
                f"another run of job id {doc.get('jobId')!r} is already pending"
            ) from None
        if updated is None:
            raise ConflictError("the run changed state meanwhile; reload and try again")
        self.engine.wake(doc["queue"])
        return updated

    async def remove(self, run_id: str) -> dict[str, Any]:
        """Delete a run that is not running (an active one would just come back)."""
        doc = await self._get(run_id)
        removable = tuple(s for s in STATES if s != "active")
        deleted = await self.runs.delete(doc["_id"], removable)
        if deleted is None:
            raise ConflictError("active runs cannot be removed; wait for them to finish")
        self.engine.count_finished(deleted["queue"], deleted["state"], -1)
        return run_view(deleted)

    async def clean(self, queue: str, state: State, older_than: float) -> int:
        """Delete finished runs of a queue older than `older_than` seconds."""
        self._queue(queue)
        if state not in FINISHED:
            raise ValueError("only completed or failed runs can be cleaned")
        if older_than < 0:
            raise ValueError("olderThan must be >= 0 seconds")
        before = self.engine.clock() - timedelta(seconds=older_than)
        deleted = await self.runs.delete_finished_before(queue, state, before)
        self.engine.count_finished(queue, state, -deleted)
        return deleted

    async def pause(self, queue: str) -> None:
        await self.engine.set_paused(self._queue(queue), True)

    async def resume(self, queue: str) -> None:
        await self.engine.set_paused(self._queue(queue), False)

    async def repeats(self, queue: str | None = None) -> list[dict[str, Any]]:
        if queue is not None:
            self._queue(queue)
        found = await self.engine.scheduler.repeats(queue)
        last = await asyncio.gather(*(self.runs.latest_of(r.queue, r.job_id) for r in found))
        return [repeat_view(r, doc) for r, doc in zip(found, last, strict=True)]

    async def _repeat(self, queue: str, job_id: str) -> Repeat:
        self._queue(queue)
        for repeat in await self.engine.scheduler.repeats(queue):
            if repeat.job_id == job_id:
                return repeat
        raise NotFoundError(f"no repeat {job_id!r} in queue {queue!r}")

    async def run_repeat(self, queue: str, job_id: str) -> dict[str, Any]:
        """A run of the repeat now, with its data and job id, outside its schedule (the
        next fire stays where it is). If a run of that job id is pending already, that
        run is the answer (`created: false`), as for any job id."""
        repeat = await self._repeat(queue, job_id)
        added = await self.engine.add(queue, repeat.data, job_id=job_id)
        return {"runId": added.run_id, "state": added.state, "created": added.created}

    async def pause_repeat(self, queue: str, job_id: str, paused: bool) -> dict[str, Any]:
        await self._repeat(queue, job_id)
        changed = await self.engine.scheduler.pause_repeat(queue, job_id, paused)
        if changed is None:
            raise NotFoundError(f"no repeat {job_id!r} in queue {queue!r}")
        return repeat_view(changed, await self.runs.latest_of(queue, job_id))


__all__ = ["REDACTED", "ConflictError", "NotFoundError", "Operations", "redact", "run_view"]
