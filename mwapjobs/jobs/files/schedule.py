"""When passes run: one repeat (`files.interval`, default 15 minutes) adds a *sweep* run,
which adds one pass per indexable project, each at a fixed point of the interval
derived from a hash of the project's id (within the first 80 %, as the health sweep
spreads its probes), so 10,000 projects every 15 minutes make about 14 passes a minute,
each project at the same moment of every interval. Whether a pass is full or
incremental is the pass's own decision (`decide.plan`: a full one at least every
`files.full_interval`); `POST .../index` adds one now. The arithmetic is pure;
`schedule`/`unschedule` write the repeat once the engine is up.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ...config import FileIndexSettings
from ...engine import Engine

log = logging.getLogger(__name__)

QUEUE = "file-index"
SWEEP_JOB_ID = "sweep"
SPREAD_FRACTION = 0.8
MANUAL_PRIORITY = 100  # a pass asked for by hand goes first


def job_id(project_id: str) -> str:
    """One pass pending or running per project (the engine's job-id rule)."""
    return f"project:{project_id}"


def offset_fraction(project_id: str) -> float:
    """Where in a spread interval this project's pass starts, in [0, 1)."""
    digest = hashlib.sha256(f"mwapjobs-files:{project_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def delay_for(project_id: str, interval: float, spread: bool) -> float:
    return offset_fraction(project_id) * interval * SPREAD_FRACTION if spread else 0.0


class IndexData(BaseModel):
    """A `file-index` run: a sweep (adds the passes), or one project's pass."""

    model_config = ConfigDict(extra="forbid")

    sweep: bool = False
    spread: bool = True
    projectId: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    mode: Literal["auto", "incremental", "full"] = "auto"
    trigger: str | None = Field(None, max_length=40)
    requestedBy: str | None = Field(None, max_length=200)

    @model_validator(mode="after")
    def _project_unless_sweep(self) -> IndexData:
        if not self.sweep and self.projectId is None:
            raise ValueError("projectId is required for a project's pass")
        return self


async def schedule(engine: Engine, settings: FileIndexSettings) -> None:
    await engine.repeat(QUEUE, {"sweep": True, "spread": settings.spread},
                        every=settings.interval, job_id=SWEEP_JOB_ID)
    log.info("file indexing scheduled", extra={"interval": settings.interval,
                                               "fullInterval": settings.full_interval,
                                               "spread": settings.spread})


async def unschedule(engine: Engine) -> None:
    """File indexing is off: drop a repeat left from when it was on."""
    if await engine.remove_repeat(QUEUE, SWEEP_JOB_ID):
        log.info("file indexing is disabled; removed its schedule")
