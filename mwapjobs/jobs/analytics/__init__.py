"""Analytics: a daily snapshot per tenant and of the platform.

- `daily.py`: the `analytics` job (storage quota, then the snapshots) and the day's
  refresh counts from the engine's events;
- `quota.py`: the quota request per provider kind, and what its answer says (pure);
- `snapshot.py`: the documents, from grouped rows (pure);
- `api.py`, `metrics.py`: `GET /api/v1/analytics`, run now, and the platform gauges.
"""

from __future__ import annotations

import logging

from ...engine import Engine
from ...storage.analytics import AnalyticsStore
from ..context import JobContext, JobPlugin
from .api import OPENAPI, AnalyticsApi, routes
from .daily import ACTIVITY_FLUSH, JOB_ID, QUEUE, Analytics
from .metrics import add_metrics

log = logging.getLogger(__name__)


def register(ctx: JobContext) -> Analytics | None:
    settings = ctx.settings.analytics
    store = AnalyticsStore(ctx.mongo)
    add_metrics(ctx.metrics, store)
    analytics = None
    if settings.enabled:
        refreshing = ctx.jobs.get("refresh") is not None
        analytics = Analytics(store, ctx.integrations, settings, ctx.engine, ctx.http,
                              ctx.clock, cipher=ctx.cipher, policy=ctx.policy,
                              shared=ctx.limiter,
                              refresh=ctx.settings.refresh if refreshing else None,
                              user_agent=ctx.settings.refresh.user_agent,
                              round_trips=lambda: ctx.mongo.round_trips)
        analytics.register(ctx.engine.registry)
        ctx.engine.subscribe(analytics.activity.on_event)
        ctx.on_stopping.append(analytics.interrupt)
        if settings.quota and ctx.cipher is None:
            log.info("analytics: no storage quota without ENCRYPTION_KEY (tokens cannot be "
                     "read)")
    ctx.add_routes(routes(AnalyticsApi(analytics, store, settings, ctx.clock)), OPENAPI)
    if analytics is None:
        ctx.when_ready("analytics:unschedule", lambda: unschedule(ctx.engine))
        return None
    running = analytics

    async def start() -> None:
        await store.ensure_indexes()
        ctx.tasks.every("analytics:activity", ACTIVITY_FLUSH, running.activity.flush)
        await ctx.engine.repeat(QUEUE, {"trigger": "schedule"}, cron=settings.cron,
                                timezone=settings.timezone, job_id=JOB_ID)

    ctx.when_ready("analytics:schedule", start)
    return analytics


async def unschedule(engine: Engine) -> None:
    if await engine.remove_repeat(QUEUE, JOB_ID):
        log.info("analytics is disabled; removed its schedule")


PLUGIN = JobPlugin("analytics", register)
