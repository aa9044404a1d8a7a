"""What a job receives to plug itself in: the shared resources (arq's `ctx`), and the
places where it registers what it brings.

A job is a package with `PLUGIN = JobPlugin(name, register)`, listed in
`mwapjobs.jobs.DEFAULT_JOBS`. The daemon builds one `JobContext` at start and calls each
plugin's `register(ctx)` in that order, which:
- reads its own settings section (`ctx.settings.<name>`); when disabled it registers no
  queue (and may undo what it left behind, such as a stored repeat, with `when_ready`);
- registers its queues on `ctx.engine.registry` and listens with `ctx.engine.subscribe`;
- asks for work once the engine is up with `when_ready` (a repeat to create, loops to
  start on `ctx.tasks`), and for what to do when the daemon begins to stop with
  `on_stopping`;
- adds its HTTP routes and their OpenAPI paths with `add_routes`, its alert rules with
  `ctx.alerts.add_rule`, its metrics on `ctx.metrics`;
- returns a handle (or None when disabled): what tests and later jobs use
  (`daemon.jobs[name]`, `ctx.jobs[name]`).

Every request to a provider's API or token endpoint holds a slot of `ctx.limiter`, one
per provider shared by all jobs (each job's own limiter sits `within` it): its limits
are the largest any job configures (`provider_limits`), so a job alone keeps its own
limits and all of them together never send a provider more than the most generous
one would alone.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiohttp
from aiohttp import web

from ..alerts import AlertManager
from ..config import Settings
from ..crypto import MwapCipher
from ..engine import Engine
from ..metrics import DaemonMetrics
from ..outbound import UrlPolicy
from ..ratelimit import KeyedLimiter
from ..storage.integrations import IntegrationStore
from ..storage.mongo import Mongo
from ..supervisor import Supervisor

Routes = Callable[[web.Application], None]


@dataclass
class JobContext:
    settings: Settings
    engine: Engine
    mongo: Mongo
    integrations: IntegrationStore  # MWAP's integrations, providers and our notes on them
    cipher: MwapCipher | None  # None without ENCRYPTION_KEY (then MWAP's jobs are off)
    http: aiohttp.ClientSession  # shared; closed by the daemon
    clock: Callable[[], datetime]
    policy: UrlPolicy  # where credentials may be sent (outbound.py)
    alerts: AlertManager  # alert rules, and the channels tenant notifications go to
    metrics: DaemonMetrics
    tasks: Supervisor  # background loops and one-off tasks, stopped with the daemon
    jobs: dict[str, Any] = field(default_factory=dict)  # handles of the jobs registered so far
    ready: list[tuple[str, Callable[[], Awaitable[None]]]] = field(default_factory=list)
    on_stopping: list[Callable[[], None]] = field(default_factory=list)
    routes: list[Routes] = field(default_factory=list)
    openapi: dict[str, Any] = field(default_factory=dict)
    limiter: KeyedLimiter = field(init=False)  # per provider, shared by every job's requests

    def __post_init__(self) -> None:
        self.limiter = KeyedLimiter(*provider_limits(self.settings))

    def when_ready(self, name: str, step: Callable[[], Awaitable[None]]) -> None:
        """Run `step` once the engine is up (retried with backoff until it succeeds)."""
        self.ready.append((name, step))

    def add_routes(self, add: Routes, openapi: dict[str, Any]) -> None:
        """HTTP routes (a function that adds them to the app) and their OpenAPI paths."""
        self.routes.append(add)
        self.openapi.update(openapi)


@dataclass(frozen=True)
class JobPlugin:
    name: str
    register: Callable[[JobContext], Any]


def provider_limits(settings: Settings) -> tuple[int, float]:
    """The shared per-provider limits: the largest concurrency and rate of the jobs."""
    jobs = (settings.refresh, settings.health, settings.files)
    return (max(j.provider_concurrency for j in jobs), max(j.provider_rate for j in jobs))
