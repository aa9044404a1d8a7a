"""Upkeep and archiving: once a day, at a quiet hour.

- `upkeep.py`: the `maintenance` job: expired OAuth flows, history past its retention
  (archived first, then deleted in batches), the database report, within a time budget;
- `archive.py`: the compressed NDJSON files (complete or absent, rotated);
- `report.py`: indexes, orphans and sizes (never deletes);
- `decide.py`: cutoffs, archive days, rotation, index and orphan findings (pure);
- `api.py`, `metrics.py`: its HTTP routes and its metrics.
"""

from __future__ import annotations

import logging

from ...engine import Engine
from ...storage.alert_history import AlertHistoryStore
from ...storage.maintenance import MaintenanceStore
from ..context import JobContext, JobPlugin
from .api import OPENAPI, MaintenanceApi, routes
from .metrics import add_metrics
from .report import DatabaseReport
from .upkeep import JOB_ID, QUEUE, Upkeep

log = logging.getLogger(__name__)


def register(ctx: JobContext) -> Upkeep | None:
    settings = ctx.settings.maintenance
    store = MaintenanceStore(ctx.mongo)
    add_metrics(ctx.metrics, store)
    upkeep = None
    if settings.enabled:
        own = [ctx.engine.runs.ensure_indexes, ctx.integrations.ensure_indexes,
               AlertHistoryStore(ctx.mongo).ensure_indexes, store.ensure_indexes]
        upkeep = Upkeep(store, settings, ctx.engine, ctx.clock,
                        DatabaseReport(store, settings, own))
        upkeep.register(ctx.engine)
    ctx.add_routes(routes(MaintenanceApi(upkeep, store, settings)), OPENAPI)
    if upkeep is None:
        ctx.when_ready("maintenance:unschedule", lambda: unschedule(ctx.engine))
        return None

    async def start() -> None:
        await store.ensure_indexes()
        await AlertHistoryStore(ctx.mongo).ensure_indexes()
        await ctx.engine.repeat(QUEUE, {"trigger": "schedule"}, cron=settings.cron,
                                timezone=settings.timezone, job_id=JOB_ID)
        log.info("upkeep scheduled", extra={"cron": settings.cron,
                                            "timezone": settings.timezone,
                                            "archiveDir": settings.archive_dir})

    ctx.when_ready("maintenance:schedule", start)
    return upkeep


async def unschedule(engine: Engine) -> None:
    if await engine.remove_repeat(QUEUE, JOB_ID):
        log.info("upkeep is disabled; removed its schedule")


PLUGIN = JobPlugin("maintenance", register)
