"""Token refresh: every connected integration's OAuth token is refreshed before it
expires, without anyone asking.

- `runs.py`: what a refresh run is (queue, job id, data, token fingerprints);
- `handler.py`: the `token-refresh` job (one request to the provider's token endpoint);
- `cycle.py`: the policy: when the next refresh is due, what follows a failure;
- `discovery.py`: the safety net that finds integrations the backend added or changed;
- `now.py`: refresh one integration now (the manual endpoint, health checks);
- `api.py`, `rules.py`, `metrics.py`: its HTTP route, alert rules and metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..context import JobContext, JobPlugin
from .api import OPENAPI, RefreshApi, routes
from .cycle import RefreshCycle
from .discovery import RefreshSync
from .handler import TokenRefresher
from .metrics import add_metrics
from .rules import rules


@dataclass(frozen=True)
class RefreshJob:
    """The running job's parts (`daemon.jobs["refresh"]`)."""

    refresher: TokenRefresher
    cycle: RefreshCycle
    discovery: RefreshSync


def register(ctx: JobContext) -> RefreshJob | None:
    settings = ctx.settings.refresh
    enabled = settings.enabled and ctx.cipher is not None
    add_metrics(ctx.metrics, ctx.integrations, refreshing=enabled)
    ctx.add_routes(routes(RefreshApi(enabled, ctx.integrations, settings, ctx.clock)), OPENAPI)
    if not enabled:
        return None
    assert ctx.cipher is not None
    refresher = TokenRefresher(ctx.integrations, ctx.cipher, ctx.http, settings, ctx.clock,
                               policy=ctx.policy, engine=ctx.engine, tasks=ctx.tasks,
                               shared=ctx.limiter)
    refresher.register(ctx.engine.registry)
    cycle = RefreshCycle(ctx.engine, ctx.integrations, settings, ctx.clock)
    ctx.engine.subscribe(cycle.on_event)
    discovery = RefreshSync(ctx.engine, ctx.integrations, settings, ctx.clock, tasks=ctx.tasks)
    for rule in rules():
        ctx.alerts.add_rule(rule)

    async def start() -> None:
        ctx.tasks.keep("refresh:cycle", cycle.run)

    ctx.when_ready("refresh:start", start)
    # Discovery on the leader only: one instance of several reconciles the schedule.
    ctx.engine.leadership.every("refresh:discovery", settings.sync_interval, discovery.step,
                                first=0.0)
    return RefreshJob(refresher, cycle, discovery)


PLUGIN = JobPlugin("refresh", register)
