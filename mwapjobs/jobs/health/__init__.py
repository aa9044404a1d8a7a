"""Health checks: is every connected integration still working?

- `schedule.py`: the repeat that adds a sweep (`health.cron`), and where in the interval
  each probe of a spread sweep starts;
- `sweep.py`: the sweep (the `health-check` job): limits, probes, refresh-then-probe;
- `probes.py`: how each provider is probed, and what its answer says;
- `decide.py`: what a result means for the integration (pure);
- `writer.py`: the batched writes of the results;
- `api.py`, `rules.py`: its HTTP routes and its alert rule.
"""

from __future__ import annotations

import logging

from ...triggers import longest_gap
from ..context import JobContext, JobPlugin
from .api import OPENAPI, HealthApi, routes
from .rules import sweep_missed
from .schedule import schedule, unschedule
from .sweep import HealthChecker

log = logging.getLogger(__name__)


def register(ctx: JobContext) -> HealthChecker | None:
    settings = ctx.settings.health
    enabled = settings.enabled and ctx.cipher is not None
    checker = None
    if enabled:
        assert ctx.cipher is not None
        refreshing = ctx.jobs.get("refresh") is not None  # else a 401 is a failure
        checker = HealthChecker(
            ctx.integrations, ctx.cipher, ctx.http, settings, ctx.clock, engine=ctx.engine,
            refresh=ctx.settings.refresh if refreshing else None,
            user_agent=ctx.settings.refresh.user_agent, policy=ctx.policy,
            shared=ctx.limiter)
    ctx.add_routes(routes(HealthApi(checker, ctx.integrations, settings)), OPENAPI)
    if checker is None:
        ctx.when_ready("health:unschedule", lambda: unschedule(ctx.engine))
        return None
    checker.register(ctx.engine.registry)
    ctx.on_stopping.append(checker.interrupt)  # else a spread sweep holds the drain
    try:
        ctx.alerts.add_rule(sweep_missed(longest_gap(settings.cron, settings.timezone)))
    except ValueError as exc:  # `schedule` logs it as an error too
        log.warning("health_sweep_missed alert is off: health.cron does not parse",
                    extra={"error": str(exc)})
    ctx.when_ready("health:schedule", lambda: schedule(ctx.engine, settings))
    return checker


PLUGIN = JobPlugin("health", register)
