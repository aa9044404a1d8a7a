"""Token refresh: every connected integration's OAuth token is refreshed before it
expires, without anyone asking.

- `runs.py`: what a refresh run is (queue, job id, data, token fingerprints);
- `handler.py`: the `token-refresh` job (one request to the provider's token endpoint);
- `cycle.py`: the policy: when the next refresh is due, what follows a failure;
- `discovery.py`: the safety net that finds integrations the backend added or changed;
- `follow.py`: the backend's writes followed within a second, where there are change
  streams (discovery's own code applied to each change);
- `now.py`: refresh one integration now (the manual endpoint, health checks);
- `api.py`, `rules.py`, `metrics.py`: its HTTP route, alert rules and metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...storage.changes import ChangeFeeds
from ..context import JobContext, JobPlugin
from .api import OPENAPI, RefreshApi, discovery_mode, routes
from .cycle import RefreshCycle
from .discovery import RefreshSync
from .follow import ChangeFollower
from .handler import TokenRefresher
from .metrics import add_metrics
from .rules import rules


@dataclass(frozen=True)
class RefreshJob:
    """The running job's parts (`daemon.jobs["refresh"]`)."""

    refresher: TokenRefresher
    cycle: RefreshCycle
    discovery: RefreshSync
    follower: ChangeFollower


def register(ctx: JobContext) -> RefreshJob | None:
    settings = ctx.settings.refresh
    enabled = settings.enabled and ctx.cipher is not None
    add_metrics(ctx.metrics, ctx.integrations, refreshing=enabled)
    ctx.add_routes(routes(RefreshApi(enabled, ctx.integrations, settings, ctx.clock)), OPENAPI)
    if not enabled:
        ctx.add_routes(discovery_mode(lambda: "off"), {})
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
    # Discovery on the leader only: one instance of several reconciles the schedule. It
    # polls everywhere, and follows changes where the server has change streams.
    leadership = ctx.engine.leadership
    leadership.every("refresh:discovery", settings.sync_interval, discovery.step, first=0.0)
    follower = ChangeFollower(discovery, ChangeFeeds(ctx.mongo), ctx.clock,
                              lambda: leadership.leading)
    follower.register(leadership)
    ctx.add_routes(discovery_mode(lambda: follower.mode), {})
    return RefreshJob(refresher, cycle, discovery, follower)


PLUGIN = JobPlugin("refresh", register)
