"""Queues, job types and their options: what a job is, independent of how it runs.

A queue is a name, one async handler (the job type) and default options. Every
option can be overridden per job when it is added; the effective options are
stored on the run document so that a run keeps the rules it was created with
even if the configuration changes before it finishes.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from .config import QueueSettings


class PermanentError(Exception):
    """Raise from a job to fail it now: retrying cannot help (a revoked grant, bad input)."""


class TransientError(Exception):
    """Raise to ask for a retry no sooner than `retry_after` seconds (e.g. HTTP 429)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Postpone(Exception):
    """Raise to put the run back, unchanged, for `delay` seconds: no attempt is used and
    the run's deadline does not apply (e.g. its provider is on hold until an operator
    fixes the configuration). The attempt is recorded with outcome "postponed"."""

    def __init__(self, reason: str, delay: float) -> None:
        super().__init__(reason)
        self.delay = max(0.0, float(delay))


class UnknownQueueError(KeyError):
    """No queue of that name is registered."""


class InvalidJobData(ValueError):
    """A job's data does not match what its queue's job type declares."""


@dataclass(frozen=True)
class Backoff:
    """Delay before retry n (1-based): fixed, or doubling from `delay`; ±`jitter` spread; capped."""

    type: Literal["fixed", "exponential"] = "exponential"
    delay: float = 5.0
    jitter: float = 0.1
    max_delay: float = 3600.0

    def delay_for(self, retry: int, rand: Callable[[], float] = random.random) -> float:
        base = self.delay if self.type == "fixed" else self.delay * 2 ** (retry - 1)
        spread = 1 + self.jitter * (2 * rand() - 1)
        return max(0.0, min(base * spread, self.max_delay))


@dataclass(frozen=True)
class Retention:
    """How many finished runs to keep and for how long; None means no limit on that axis."""

    count: int | None = 1000
    age: float | None = 7 * 86400.0


@dataclass(frozen=True)
class JobOptions:
    attempts: int = 3
    backoff: Backoff = field(default_factory=Backoff)
    concurrency: int = 10
    priority: int = 0
    timeout: float = 300.0
    keep_completed: Retention = field(default_factory=Retention)
    keep_failed: Retention = field(default_factory=lambda: Retention(5000, 30 * 86400.0))

    @classmethod
    def from_settings(cls, s: QueueSettings) -> JobOptions:
        return cls(
            attempts=s.attempts,
            backoff=Backoff(**s.backoff.model_dump()),
            concurrency=s.concurrency,
            priority=s.priority,
            timeout=s.timeout,
            keep_completed=Retention(**s.keep_completed.model_dump()),
            keep_failed=Retention(**s.keep_failed.model_dump()),
        )

    def override(self, **changes: Any) -> JobOptions:
        """These options with the non-None `changes` applied (a dict backoff is merged)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if isinstance(changes.get("backoff"), Mapping):
            changes["backoff"] = replace(self.backoff, **changes["backoff"])
        return replace(self, **changes)

    def backoff_doc(self) -> dict[str, Any]:
        return asdict(self.backoff)


@dataclass(frozen=True)
class Job:
    """What a handler receives: one attempt of one run."""

    run_id: str
    queue: str
    job_id: str | None
    data: dict[str, Any]
    attempt: int
    max_attempts: int
    created_at: datetime
    deadline: datetime | None


@dataclass(frozen=True)
class AndThen:
    """What a handler may return to schedule its job's next run (same queue) with this
    one's outcome: `result` is the run's result; the next run is written in the same
    round trip as the completion, and only if it completes. If a pending run of
    `job_id` exists by then (someone added one meanwhile), that run is moved to this
    time and data instead, as `add(..., replace=True)` does."""

    result: Any
    data: dict[str, Any]
    job_id: str
    run_at: datetime
    deadline: datetime | None = None


Handler = Callable[[Job], Awaitable[Any]]


@dataclass(frozen=True)
class Queue:
    name: str
    handler: Handler
    options: JobOptions
    data: type[BaseModel] | None = None  # what the job type needs in `Job.data`

    def check_data(self, data: Any) -> dict[str, Any]:
        """`data` if the job type accepts it, else InvalidJobData naming the field."""
        if not isinstance(data, dict):
            raise InvalidJobData("data must be a JSON object")
        if self.data is not None:
            try:
                self.data.model_validate(data)
            except ValidationError as exc:
                raise InvalidJobData(_first_problem(exc)) from None
        return data


def _first_problem(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in ("data", *err["loc"]))
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {err['msg']}{more}"


class QueueRegistry:
    """Named queues, each registered once with its handler and default options."""

    def __init__(self, settings: Callable[[str], QueueSettings] | None = None) -> None:
        self._queues: dict[str, Queue] = {}
        self._settings = settings or (lambda _name: QueueSettings())

    def register(self, name: str, handler: Handler, *, data: type[BaseModel] | None = None,
                 **options: Any) -> Queue:
        """Register `handler` as the job type of queue `name`.

        `data` is a pydantic model of what the handler needs in `Job.data`: a job whose
        data does not match is refused when it is added (and fails for good, with the
        reason, if it got into the database some other way).

        Options start from the queue's `[queues.NAME]` settings; `options`
        given here are code defaults that configuration cannot see, so they
        only fill in what the operator left at its default.
        """
        if name in self._queues:
            raise ValueError(f"queue {name!r} is already registered")
        if not name or not all(c.isalnum() or c in "-_" for c in name):
            raise ValueError(f"queue name {name!r}: use letters, digits, '-' and '_'")
        configured = self._settings(name)
        explicit = configured.model_dump(exclude_unset=True).keys()
        code_defaults = {k: v for k, v in options.items() if k not in explicit}
        effective = JobOptions.from_settings(configured).override(**code_defaults)
        queue = Queue(name, handler, effective, data)
        self._queues[name] = queue
        return queue

    def get(self, name: str) -> Queue:
        try:
            return self._queues[name]
        except KeyError:
            raise UnknownQueueError(name) from None

    def __contains__(self, name: object) -> bool:
        return name in self._queues

    def __iter__(self) -> Iterator[Queue]:
        return iter(self._queues.values())

    def names(self) -> list[str]:
        return list(self._queues)
