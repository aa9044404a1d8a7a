"""The daemon, the composition root: builds the shared parts, lets each job plug in
(`jobs/context.py`), serves HTTP, and runs the engine while MongoDB answers. Also the
programmatic entry point (README, "Using it from Python"); signals are `signals.py`'s.

Start-up never waits for MongoDB: HTTP (and /healthz) come up first, `/readyz` says why
the daemon is not ready, and the bring-up is retried with backoff, so an outage at boot
does not crash-loop the unit and the daemon recovers by itself."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import aiohttp
from aiohttp import web

from . import gcpolicy
from .alerts import AlertManager
from .api.app import Resources, build_app
from .api.auth import Authenticator, JwksCache
from .api.server import GuardedRunner, quiet_accept_errors
from .config import ConfigError, Settings, secret_values
from .crypto import MwapCipher
from .engine import Engine, utcnow
from .jobs import DEFAULT_JOBS, JobContext, JobPlugin
from .logs import secrets
from .loopmon import LoopLagMonitor
from .metrics import DaemonMetrics
from .operations import Operations
from .outbound import UrlPolicy
from .queues import QueueRegistry
from .storage.identity import IdentityStore
from .storage.integrations import IntegrationStore
from .storage.jobstore import configured_key
from .storage.mongo import Mongo
from .supervisor import Supervisor
from .systemd import notify, ping_watchdog, watchdog_interval
from .timeouts import within

log = logging.getLogger(__name__)


class Daemon:
    def __init__(self, settings: Settings, *, mongo: Mongo | None = None,
                 registry: QueueRegistry | None = None,
                 clock: Callable[[], datetime] = utcnow,
                 jobs: Sequence[JobPlugin] = DEFAULT_JOBS) -> None:
        self.settings, self.clock, self.plugins = settings, clock, tuple(jobs)
        for secret in secret_values(settings):
            secrets.add(secret)
        self._owns_mongo = mongo is None  # an injected client is closed by whoever made it
        self.mongo = mongo or Mongo.connect(settings.mongodb_uri.get_secret_value(),
                                            settings.mongodb.server_selection_timeout,
                                            socket_timeout=settings.mongodb.socket_timeout)
        self.registry = registry or QueueRegistry(settings.queue)
        self.engine = Engine(self.mongo, self.registry, settings.engine, clock=clock,
                             signing_key=configured_key(settings))
        self.operations = Operations(self.engine)
        self.integrations = IntegrationStore(self.mongo)
        key = settings.encryption_key.get_secret_value() if settings.encryption_key else ""
        self.cipher = MwapCipher(key) if key else None
        self.jwks = JwksCache.from_settings(settings)
        self.auth = Authenticator(settings, IdentityStore(self.mongo), self.jwks)
        self.loop_lag = LoopLagMonitor()
        self.tasks = Supervisor()
        self.alerts = AlertManager(settings, self.mongo, self.registry, clock=clock,
                                   mongo_down_since=lambda: self.mongo.down_since,
                                   mongo_error=lambda: self.mongo.last_error,
                                   is_paused=self.engine.is_paused,
                                   term=lambda: self.engine.leadership.term)
        self.metrics = DaemonMetrics(self.engine, self.operations, self.mongo, self.loop_lag,
                                     lambda: not self.not_ready_reasons(),
                                     source_timeout=settings.mongodb.server_selection_timeout)
        self.jobs: dict[str, Any] = {}  # each job's handle (None when it is disabled)
        self.stopping = False
        self.port: int | None = None
        self.http: aiohttp.ClientSession | None = None
        self._ctx: JobContext | None = None
        self._runner: web.AppRunner | None = None
        self._release_gc: Callable[[], None] = lambda: None
        self._engine_up = asyncio.Event()

    async def start(self) -> None:
        """Serve HTTP now; bring the engine up in the background. Raises ConfigError for
        a `[queues.NAME]` section that names no registered queue (a typo must not pass)."""
        if self.mongo.embedded:
            log.warning("running on the embedded in-memory store: nothing is durable, every job "
                        "and schedule is lost when the process exits (set MONGODB_URI to persist)")
        app = self.app()
        unknown = sorted(set(self.settings.queues) - set(self.registry.names()))
        if unknown:
            if self.http is not None:
                await self.http.close()
            raise ConfigError(f"queues.{unknown[0]}: no such queue (known: "
                              f"{', '.join(self.registry.names()) or 'none'})")
        self.loop_lag.start()
        quiet_accept_errors(asyncio.get_running_loop())
        self._runner = GuardedRunner(app, access_log=None, handle_signals=False,
                                     max_connections=self.settings.http.max_connections,
                                     idle_timeout=self.settings.http.idle_timeout)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.http.host, self.settings.http.port)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self.settings.http.port
        self.tasks.keep("bring-up", self._bring_up, message="engine start failed; retrying",
                        max_backoff=self.settings.mongodb.connect_retry_max)
        self.tasks.every("mongo-monitor", self.settings.mongodb.ping_interval, self._watch)
        await self.alerts.start()  # now: the mongodb_down rule covers an outage at boot too
        interval = watchdog_interval()
        if interval:
            self.tasks.every("watchdog", interval, ping_watchdog, first=0.0)
        self._release_gc = gcpolicy.install(self.tasks)  # no full collection in a burst
        notify("READY=1")
        log.info("listening", extra={"host": self.settings.http.host, "port": self.port})

    def app(self) -> web.Application:
        """The HTTP application, every job plugged in (the first call plugs them in).
        `start` serves it; tests may serve it themselves with aiohttp's TestServer."""
        if self._ctx is None:
            self.http = aiohttp.ClientSession()
            self._ctx = self._plug_in(self.http)
        resources = Resources(self.settings, self.auth, self.engine, self.operations,
                              self.not_ready_reasons, self.metrics)
        return build_app(resources, self._ctx.routes, self._ctx.openapi)

    def _plug_in(self, http: aiohttp.ClientSession) -> JobContext:
        """Build the jobs' context once and let each job register what it brings."""
        ctx = JobContext(
            settings=self.settings, engine=self.engine, mongo=self.mongo,
            integrations=self.integrations, cipher=self.cipher, http=http, clock=self.clock,
            policy=UrlPolicy(self.settings.outbound.hosts,
                             allow_loopback=self.settings.outbound.allow_loopback),
            alerts=self.alerts, metrics=self.metrics, tasks=self.tasks, jobs=self.jobs)
        for plugin in self.plugins:
            self.jobs[plugin.name] = plugin.register(ctx)
        return ctx

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until the engine runs (tests, embedding)."""
        await within(self._engine_up.wait(), timeout)

    async def stop(self, timeout: float | None = None) -> None:
        """Graceful stop: drain jobs for up to `shutdown_timeout`, then close everything.
        Unfinished work stays in MongoDB and resumes at the next start."""
        if self.stopping:
            return
        self.stopping = True
        notify("STOPPING=1")
        timeout = self.settings.shutdown_timeout if timeout is None else timeout
        log.info("shutting down", extra={"timeout": timeout,
                                         "activeRuns": self.engine.active_count})
        await self.tasks.cancel("bring-up")
        for hook in self._ctx.on_stopping if self._ctx else ():
            hook()
        if self.engine.running:
            await self.engine.stop(timeout)
        await self.tasks.stop()
        await self.alerts.stop()
        await self.loop_lag.stop()
        self._release_gc()
        if self._runner is not None:
            await self._runner.cleanup()
        if self.http is not None:
            await self.http.close()
        if self.jwks is not None:
            await self.jwks.close()
        if self._owns_mongo:
            await self.mongo.aclose()
        log.info("stopped")

    def not_ready_reasons(self) -> list[str]:
        reasons = []
        if self.stopping:
            reasons.append("shutting down")
        if not self.mongo.reachable:
            reasons.append(f"mongodb unreachable: {self.mongo.last_error}")
        if not self.engine.running:
            reasons.append("scheduler not running" if not self.engine.scheduler.running
                           else "scheduler thread died or is stuck; restarting it")
        return reasons

    async def _watch(self) -> None:
        with contextlib.suppress(Exception):  # the door logs an outage (Mongo.mark_down)
            await self.mongo.ping(self.settings.mongodb.ping_timeout)

    async def _bring_up(self) -> None:
        """Connect and start the engine (the supervisor retries it with backoff), then
        the work each job asked for once the engine is up."""
        await self.mongo.ping(self.settings.mongodb.ping_timeout)
        await self.integrations.ensure_indexes()
        await self.engine.start()
        self._engine_up.set()
        for name, step in self._ctx.ready if self._ctx else ():
            self.tasks.keep(name, step, max_backoff=60.0)
