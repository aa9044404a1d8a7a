"""The `demo` queue and its sample data, for `mwapjobs demo` on the embedded store.

It gives a first-time user (and the end-to-end tests) real runs in every
state without any MWAP data: jobs that sleep, one that fails for good, one
that succeeds on its second attempt, delayed ones and a repeat.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..engine import Engine
from ..queues import Job, PermanentError, QueueRegistry

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


def register(registry: QueueRegistry) -> None:
    registry.register(QUEUE, demo_job, data=DemoData, concurrency=4, backoff={"delay": 2.0})


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
