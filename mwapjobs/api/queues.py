"""The admin REST API under /api/v1/queues: what bull-board's buttons do, for curl.

Every route needs an admin token or a superadmin, and every state change
writes an audit line. Handlers only translate HTTP to `Operations` calls and
`Operations` errors back to HTTP.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from aiohttp import web

from ..logs import audit
from ..operations import (
    MAX_PAGE_SIZE,
    MAX_THROUGHPUT_MINUTES,
    ConflictError,
    NotFoundError,
    Operations,
)
from ..storage.runs import FINISHED, MAX_SEARCH_VALUE, SEARCH_FIELD, STATES, RunSearch
from .auth import Caller
from .envelope import ApiError, json_body, ok
from .keys import AUTH, ENGINE, OPERATIONS
from .validation import query_int

Handler = Callable[[web.Request], Awaitable[web.Response]]
MAX_OLDER_THAN = 100 * 366 * 86400.0  # a century: anything older is "everything"


def stats_key(queue: str) -> str:
    """The seed's names: `token-refresh` → `tokenRefresh`."""
    head, *rest = re.split(r"[-_]", queue)
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


async def _admin(request: web.Request) -> Caller:
    return await request.app[AUTH].require_admin(request)


def _ops(request: web.Request) -> Operations:
    if not request.app[ENGINE].running:
        raise ApiError(503, "service/not-ready", "The job engine is not running yet.")
    return request.app[OPERATIONS]


def _queue(request: web.Request) -> str:
    name = request.match_info["queue"]
    if name not in request.app[ENGINE].registry:
        raise ApiError(404, "queue/not-found", f"No queue named {name[:64]!r}.")
    return name


def _run_id(request: web.Request) -> str:
    run_id = request.match_info["runId"]
    if not re.fullmatch(r"[0-9a-f]{24}", run_id):
        raise ApiError(400, "validation/invalid-id", "runId must be 24 hexadecimal characters")
    return run_id


def _translate(handler: Handler) -> Handler:
    """Map the operations' errors to HTTP: not found → 404, conflict → 409, bad value → 400."""

    async def wrapped(request: web.Request) -> web.Response:
        try:
            return await handler(request)
        except NotFoundError as exc:
            raise ApiError(404, "queue/not-found", str(exc)) from None
        except ConflictError as exc:
            raise ApiError(409, "queue/conflict", str(exc)) from None
        except ValueError as exc:
            raise ApiError(400, "validation/invalid-parameter", str(exc)) from None

    return wrapped


@_translate
async def stats(request: web.Request) -> web.Response:
    await _admin(request)
    by_queue = await _ops(request).stats()
    return ok({stats_key(name): counts for name, counts in by_queue.items()})


def _bad(message: str) -> ApiError:
    return ApiError(400, "validation/invalid-parameter", message)


def _search(request: web.Request, queue: str | None) -> RunSearch | None:
    """The search the query asks for (`jobId`, `field` + `value`, `state`), or None for
    a plain list. `jobId=abc*` finds the job ids starting with `abc`."""
    query = request.query
    unknown = set(query) - {"state", "jobId", "field", "value", "page", "pageSize", "queue"}
    if unknown:
        raise _bad(f"unknown parameter(s): {', '.join(sorted(unknown))[:200]}")
    job_id = query.get("jobId")
    field = query.get("field")
    value = query.get("value")
    prefix = False
    if job_id is not None:
        prefix = job_id.endswith("*")
        job_id = job_id[:-1] if prefix else job_id
        if not 0 < len(job_id) <= 200 or "*" in job_id:
            raise _bad("jobId must be 1-200 characters, with at most one * at the end")
    if (field is None) != (value is None):
        raise _bad("field and value go together: field=integrationId&value=…")
    if field is not None and value is not None:
        fields = request.app[ENGINE].runs.search_fields
        if not SEARCH_FIELD.fullmatch(field) or field not in fields:
            raise _bad(f"field must be one of {', '.join(fields) or '(none configured)'}")
        if not 0 < len(value) <= MAX_SEARCH_VALUE:
            raise _bad(f"value must be 1-{MAX_SEARCH_VALUE} characters")
    searching = job_id is not None or field is not None
    state = query.get("state", "all" if searching else "failed")
    if state not in (*STATES, "all"):
        raise _bad(f"state must be one of {', '.join(STATES)} or all")
    if not searching:
        if state == "all":
            raise _bad("state=all needs a search: jobId, or field and value")
        return None
    return RunSearch(queue=queue, state=None if state == "all" else state,  # type: ignore[arg-type]
                     job_id=job_id, job_id_prefix=prefix, field=field, value=value)


@_translate
async def list_runs(request: web.Request) -> web.Response:
    await _admin(request)
    queue = _queue(request)
    search = _search(request, queue)
    page = query_int(request, "page", 1, 1, 1_000_000)
    size = query_int(request, "pageSize", 20, 1, MAX_PAGE_SIZE)
    if search is not None:
        return ok(await _ops(request).search(search, page, size))
    state = request.query.get("state", "failed")
    return ok(await _ops(request).list_runs(queue, state, page, size))  # type: ignore[arg-type]


@_translate
async def find_runs(request: web.Request) -> web.Response:
    """Runs of every queue (or `queue`) by job id or data field: "Find a run"."""
    await _admin(request)
    queue = request.query.get("queue")
    if queue is not None and queue not in request.app[ENGINE].registry:
        raise ApiError(404, "queue/not-found", f"No queue named {queue[:64]!r}.")
    search = _search(request, queue)
    if search is None:
        raise _bad("give jobId, or field and value")
    page = query_int(request, "page", 1, 1, 1_000_000)
    size = query_int(request, "pageSize", 20, 1, MAX_PAGE_SIZE)
    return ok(await _ops(request).search(search, page, size))


def _as_of(body: dict[str, object]) -> datetime | None:
    raw = body.get("asOf")
    if raw is None:
        return None
    if not isinstance(raw, str) or len(raw) > 40:
        raise _bad("asOf must be an ISO 8601 time, as the dry run answered it")
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        raise _bad("asOf must be an ISO 8601 time, as the dry run answered it") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _dry_run(body: dict[str, object]) -> bool:
    dry = body.get("dryRun", False)
    if not isinstance(dry, bool):
        raise _bad("dryRun must be true or false")
    return dry


@_translate
async def retry_failed(request: web.Request) -> web.Response:
    """Retry every failed run of a queue (of one error type): `dryRun` counts them and
    answers `asOf`; the action with that `asOf` leaves runs that failed after the count."""
    caller = await _admin(request)
    queue = _queue(request)
    body = await json_body(request)
    unknown = set(body) - {"dryRun", "errorType", "asOf"}
    if unknown:
        raise _bad(f"unknown field(s): {', '.join(sorted(unknown))[:200]}")
    error_type = body.get("errorType")
    if error_type is not None and (not isinstance(error_type, str)
                                   or not 0 < len(error_type) <= 200):
        raise _bad("errorType must be a string of 1-200 characters")
    ops = _ops(request)
    if _dry_run(body):
        return ok(await ops.failed_summary(queue, error_type))
    result = await ops.retry_failed(queue, error_type, _as_of(body))
    audit("queue.bulk.retry", caller.actor, f"queue:{queue}", errorType=error_type,
          retried=result["retried"], skipped=result["skipped"])
    return ok(result)


@_translate
async def promote_delayed(request: web.Request) -> web.Response:
    """Run every delayed run of a queue now: `dryRun` counts them, as for retry-failed."""
    caller = await _admin(request)
    queue = _queue(request)
    body = await json_body(request)
    unknown = set(body) - {"dryRun", "asOf"}
    if unknown:
        raise _bad(f"unknown field(s): {', '.join(sorted(unknown))[:200]}")
    ops = _ops(request)
    if _dry_run(body):
        return ok(await ops.delayed_summary(queue))
    result = await ops.promote_delayed(queue, _as_of(body))
    audit("queue.bulk.promote", caller.actor, f"queue:{queue}", promoted=result["promoted"])
    return ok(result)


@_translate
async def get_run(request: web.Request) -> web.Response:
    await _admin(request)
    return ok(await _ops(request).get_run(_run_id(request)))


def _run_action(action: str) -> Handler:
    @_translate
    async def handler(request: web.Request) -> web.Response:
        caller = await _admin(request)
        run_id = _run_id(request)
        run = await getattr(_ops(request), action)(run_id)
        audit(f"queue.run.{action}", caller.actor, f"run:{run_id}", queue=run["queue"])
        return ok(run)

    return handler


@_translate
async def clean(request: web.Request) -> web.Response:
    caller = await _admin(request)
    queue = _queue(request)
    body = await json_body(request)
    state = body.get("state", "completed")
    older_than = body.get("olderThan", 0)
    if state not in FINISHED:
        raise ApiError(400, "validation/invalid-parameter", "state must be completed or failed")
    if not _number(older_than) or not 0 <= older_than <= MAX_OLDER_THAN:
        raise ApiError(400, "validation/invalid-parameter",
                       f"olderThan must be a number of seconds from 0 to {MAX_OLDER_THAN:.0f}")
    deleted = await _ops(request).clean(queue, state, float(older_than))
    audit("queue.clean", caller.actor, f"queue:{queue}", state=state, olderThan=older_than,
          deleted=deleted)
    return ok({"deleted": deleted})


def _pause_action(paused: bool) -> Handler:
    @_translate
    async def handler(request: web.Request) -> web.Response:
        caller = await _admin(request)
        queue = _queue(request)
        ops = _ops(request)
        await (ops.pause(queue) if paused else ops.resume(queue))
        audit("queue.pause" if paused else "queue.resume", caller.actor, f"queue:{queue}")
        return ok({"queue": queue, "isPaused": paused})

    return handler


@_translate
async def add_job(request: web.Request) -> web.Response:
    """Add a job by hand (bull-board's "add job"): data, jobId, delay, priority, attempts."""
    caller = await _admin(request)
    queue = _queue(request)
    body = await json_body(request)
    unknown = set(body) - {"data", "jobId", "delay", "priority", "attempts"}
    if unknown:
        raise ApiError(400, "validation/invalid-parameter",
                       f"unknown field(s): {', '.join(sorted(unknown))}")
    data = body.get("data", {})
    job_id = body.get("jobId")
    delay = body.get("delay")
    priority = body.get("priority")
    attempts = body.get("attempts")
    if not isinstance(data, dict):
        raise ValueError("data must be a JSON object")
    if job_id is not None and (not isinstance(job_id, str) or not 0 < len(job_id) <= 200):
        raise ValueError("jobId must be a string of 1-200 characters")
    if delay is not None and (not _number(delay) or not 0 <= delay <= 366 * 86400):
        raise ValueError("delay must be a number of seconds between 0 and one year")
    for name, value, low, high in (("priority", priority, -1000, 1000),
                                   ("attempts", attempts, 1, 100)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or not low <= value <= high):
            raise ValueError(f"{name} must be an integer between {low} and {high}")
    added = await request.app[ENGINE].add(
        queue, data, job_id=job_id, delay=delay, priority=priority, attempts=attempts)
    audit("queue.job.add", caller.actor, f"run:{added.run_id}", queue=queue)
    return ok({"runId": added.run_id, "state": added.state, "created": added.created},
              status=201 if added.created else 200)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@_translate
async def throughput(request: web.Request) -> web.Response:
    """Completed and failed runs per minute per queue (the per-minute counters)."""
    await _admin(request)
    queue = request.query.get("queue")
    if queue is not None and queue not in request.app[ENGINE].registry:
        raise ApiError(404, "queue/not-found", f"No queue named {queue[:64]!r}.")
    minutes = query_int(request, "minutes", MAX_THROUGHPUT_MINUTES, 1, MAX_THROUGHPUT_MINUTES)
    return ok(await _ops(request).throughput(minutes, queue))


@_translate
async def repeats(request: web.Request) -> web.Response:
    await _admin(request)
    queue = request.query.get("queue")
    if queue is not None and queue not in request.app[ENGINE].registry:
        raise ApiError(404, "queue/not-found", f"No queue named {queue[:64]!r}.")
    return ok(await _ops(request).repeats(queue))


def _repeat_key(request: web.Request) -> tuple[str, str]:
    queue = _queue(request)
    job_id = request.match_info["jobId"]
    if not 0 < len(job_id) <= 200:
        raise _bad("jobId must be 1-200 characters")
    return queue, job_id


@_translate
async def run_repeat(request: web.Request) -> web.Response:
    caller = await _admin(request)
    queue, job_id = _repeat_key(request)
    result = await _ops(request).run_repeat(queue, job_id)
    audit("queue.repeat.run", caller.actor, f"repeat:{queue}:{job_id}", runId=result["runId"],
          created=result["created"])
    return ok(result, status=202)


def _repeat_pause(paused: bool) -> Handler:
    @_translate
    async def handler(request: web.Request) -> web.Response:
        caller = await _admin(request)
        queue, job_id = _repeat_key(request)
        repeat = await _ops(request).pause_repeat(queue, job_id, paused)
        audit("queue.repeat.pause" if paused else "queue.repeat.resume", caller.actor,
              f"repeat:{queue}:{job_id}")
        return ok(repeat)

    return handler


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/api/v1/queues/stats", stats)
    r.add_get("/api/v1/queues/repeats", repeats)
    r.add_get("/api/v1/queues/runs", find_runs)
    r.add_get("/api/v1/queues/throughput", throughput)
    r.add_post("/api/v1/queues/repeats/{queue}/{jobId}/run", run_repeat)
    r.add_post("/api/v1/queues/repeats/{queue}/{jobId}/pause", _repeat_pause(True))
    r.add_post("/api/v1/queues/repeats/{queue}/{jobId}/resume", _repeat_pause(False))
    r.add_get("/api/v1/queues/runs/{runId}", get_run)
    r.add_post("/api/v1/queues/runs/{runId}/retry", _run_action("retry"))
    r.add_post("/api/v1/queues/runs/{runId}/promote", _run_action("promote"))
    r.add_delete("/api/v1/queues/runs/{runId}", _run_action("remove"))
    r.add_get("/api/v1/queues/{queue}/runs", list_runs)
    r.add_post("/api/v1/queues/{queue}/jobs", add_job)
    r.add_post("/api/v1/queues/{queue}/clean", clean)
    r.add_post("/api/v1/queues/{queue}/retry-failed", retry_failed)
    r.add_post("/api/v1/queues/{queue}/promote-delayed", promote_delayed)
    r.add_post("/api/v1/queues/{queue}/pause", _pause_action(True))
    r.add_post("/api/v1/queues/{queue}/resume", _pause_action(False))
