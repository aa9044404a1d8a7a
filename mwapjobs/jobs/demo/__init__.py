"""The `demo` job and its sample data, for `mwapjobs demo` on the embedded store.

It gives a first-time user (and the end-to-end tests) real runs in every
state without any MWAP data: jobs that sleep, one that fails for good, one
that succeeds on its second attempt, delayed ones and a repeat.

It is also the smallest example of a job that plugs in (README, "How to add a job"):
a handler, a data model, and `register(ctx)` adding its queue and, once the engine is
up, its sample runs.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ...engine import Engine
from ...queues import Job, PermanentError, QueueRegistry
from ..context import JobContext, JobPlugin

QUEUE = "demo"


class DemoData(BaseModel):
    """What a demo job may be given; anything else is kept and ignored."""

    model_config = ConfigDict(extra="allow")
    seconds: float = Field(0.1, ge=0, le=3600)
    fail: str | None = None
    succeed_on: int = Field(1, ge=1, le=100)


async def demo_job(job: Job) -> dict[str, Any]:
    """Sleep `seconds`; fail for good with `fail`, or until attempt `succeed_on`."""
    await asyncio.sleep(float(job.data.get("seconds", 0.1)))
    if job.data.get("fail"):
        raise PermanentError(str(job.data["fail"]))
    if job.attempt < int(job.data.get("succeed_on", 1)):
        raise RuntimeError(f"attempt {job.attempt} fails on purpose")
    return {"slept": job.data.get("seconds", 0.1), "attempt": job.attempt}


def add_queue(registry: QueueRegistry) -> None:
    registry.register(QUEUE, demo_job, data=DemoData, concurrency=4, backoff={"delay": 2.0})


def plugin(job_seconds: float | None = None) -> JobPlugin:
    """The demo job; with `job_seconds`, it also adds its sample runs once the engine is
    up (`mwapjobs demo`)."""

    def register(ctx: JobContext) -> None:
        add_queue(ctx.engine.registry)
        if job_seconds is not None:
            ctx.when_ready("demo:seed", lambda: seed(ctx.engine, job_seconds))

    return JobPlugin("demo", register)


async def seed(engine: Engine, job_seconds: float = 1.0) -> None:
    """Sample runs: some complete, one fails, one retries, two wait, one repeats."""
    for i in range(3):
        await engine.add(QUEUE, {"seconds": job_seconds, "n": i}, job_id=f"sample-{i}")
    await engine.add(QUEUE, {"seconds": 0.1, "fail": "the demo job gave up"}, job_id="fails")
    await engine.add(QUEUE, {"seconds": 0.1, "succeed_on": 2}, job_id="retries")
    await engine.add(QUEUE, {"seconds": 0.1}, job_id="later", delay=600)
    await engine.add(QUEUE, {"seconds": 0.1, "accessToken": "not-shown"}, job_id="much-later",
                     delay=3600)
    await engine.repeat(QUEUE, {"seconds": 0.1}, every=30, job_id="every-30s")
