"""The daemon: settings, MongoDB, engine and HTTP server in one asyncio process.

`Daemon` is also the programmatic entry point (tests and embedding):

    daemon = Daemon(settings, mongo=Mongo.from_clients(mongomock.MongoClient()))
    await daemon.start()          # HTTP up; the engine comes up when MongoDB answers
    await daemon.wait_ready()
    ...
    await daemon.stop()           # graceful drain, as on SIGTERM

Start-up never waits for MongoDB: the HTTP server (and /healthz) come up first,
`/readyz` says why the daemon is not ready, and a background task keeps
retrying with backoff. So a database outage at boot does not crash-loop the
unit, and the daemon recovers by itself when MongoDB comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Any

import aiohttp
from aiohttp import web
from pydantic import SecretStr

from .alerts import AlertManager
from .api.app import build_app
from .api.server import GuardedRunner, quiet_accept_errors
from .auth import Authenticator, JwksCache
from .config import ConfigError, Settings, uri_secrets
from .crypto import MwapCipher
from .engine import Engine, utcnow
from .jobs.health_check import HealthChecker, unschedule
from .jobs.refresh_sync import RefreshSync
from .jobs.token_refresh import TokenRefresher, follow_up_failures
from .logs import secrets, stop_logging
from .loopmon import LoopLagMonitor
from .metrics import DaemonMetrics
from .operations import Operations
from .outbound import UrlPolicy
from .queues import QueueRegistry
from .storage.identity import IdentityStore
from .storage.integrations import IntegrationStore
from .storage.jobstore import signing_key
from .storage.mongo import Mongo
from .systemd import notify, watchdog, watchdog_interval

log = logging.getLogger(__name__)
QUIT_RELEASE_SECONDS = 2.0


class Daemon:
    def __init__(
        self,
        settings: Settings,
        *,
        mongo: Mongo | None = None,
        registry: QueueRegistry | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.settings = settings
        uri = settings.mongodb_uri.get_secret_value()
        for _, value in settings:
            if isinstance(value, SecretStr):
                secrets.add(value.get_secret_value())
        for part in uri_secrets(uri):
            secrets.add(part)
        self._owns_mongo = mongo is None  # an injected client is closed by whoever made it
        self.mongo = mongo or Mongo.connect(uri, settings.mongodb.server_selection_timeout,
                                            socket_timeout=settings.mongodb.socket_timeout)
        self.registry = registry or QueueRegistry(settings.queue)
        self.clock = clock
        self.engine = Engine(self.mongo, self.registry, settings.engine, clock=clock,
                             signing_key=_signing_key(settings))
        self.operations = Operations(self.engine)
        self.integrations = IntegrationStore(self.mongo)
        key = settings.encryption_key.get_secret_value() if settings.encryption_key else ""
        self.cipher = MwapCipher(key) if key else None
        self.policy = UrlPolicy(settings.outbound.hosts,
                                allow_loopback=settings.outbound.allow_loopback)
        self.http: aiohttp.ClientSession | None = None
        self.refresher: TokenRefresher | None = None
        self.refresh_sync: RefreshSync | None = None
        self.health_checker: HealthChecker | None = None
        self.jwks = JwksCache.from_settings(settings)
        self.auth = Authenticator(settings, IdentityStore(self.mongo), self.jwks)
        self.loop_lag = LoopLagMonitor()
        self.stopping = False
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._engine_up = asyncio.Event()
        self.alerts = AlertManager(settings, self.mongo, self.registry, clock=clock,
                                   mongo_down_since=lambda: self.mongo.down_since,
                                   mongo_error=lambda: self.mongo.last_error,
                                   is_paused=self.engine.is_paused)
        self.metrics = DaemonMetrics(self)  # subscribes to the engine's events

    @property
    def mongo_reachable(self) -> bool:
        return self.mongo.reachable

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Serve HTTP now; bring the engine up in the background.

        Raises ConfigError for a `[queues.NAME]` section that names no registered queue
        (a typo must not pass silently)."""
        if self.mongo.embedded:
            log.warning(
                "running on the embedded in-memory store: nothing is durable, every job "
                "and schedule is lost when the process exits (set MONGODB_URI to persist)"
            )
        self.loop_lag.start()
        self.http = aiohttp.ClientSession()
        self._add_mwap_jobs(self.http)
        unknown = sorted(set(self.settings.queues) - set(self.registry.names()))
        if unknown:
            await self.http.close()
            await self.loop_lag.stop()
            raise ConfigError(
                f"queues.{unknown[0]}: no such queue (known: "
                f"{', '.join(self.registry.names()) or 'none'})")
        quiet_accept_errors(asyncio.get_running_loop())
        self._runner = GuardedRunner(build_app(self), access_log=None, handle_signals=False,
                                     max_connections=self.settings.http.max_connections,
                                     idle_timeout=self.settings.http.idle_timeout)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.http.host, self.settings.http.port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self.settings.http.port
        self._spawn(self._bring_up(), "bring-up")
        self._spawn(self._watch_mongo(), "mongo-monitor")
        # Not after bring-up: the mongodb_down rule must also cover an outage at boot.
        await self.alerts.start()
        interval = watchdog_interval()
        if interval:
            self._spawn(watchdog(interval), "watchdog")
        # Everything made so far lives as long as the process. A full garbage collection
        # stops every thread, and measured during a 10,000-job burst it took 40-58 ms,
        # most of it re-scanning these objects; frozen, they are never scanned again.
        gc.freeze()
        notify("READY=1")
        log.info("listening", extra={"host": self.settings.http.host, "port": self.port})

    def _add_mwap_jobs(self, http: aiohttp.ClientSession) -> None:
        """Register the job types that work on MWAP's data (needs the HTTP client)."""
        if self.settings.refresh.enabled and self.cipher is not None:
            self.refresher = TokenRefresher(self.integrations, self.cipher, http,
                                            self.settings.refresh, self.clock,
                                            policy=self.policy)
            self.refresher.register(self.registry)
            follow_up_failures(self.engine, self.refresher)
            self.refresh_sync = RefreshSync(self.engine, self.integrations,
                                            self.settings.refresh, self.clock)
        if self.settings.health.enabled and self.cipher is not None:
            self.health_checker = HealthChecker(
                self.integrations, self.cipher, http, self.settings.health, self.clock,
                engine=self.engine, operations=self.operations,
                refresh=self.settings.refresh if self.refresher is not None else None,
                user_agent=self.settings.refresh.user_agent,
                policy=self.policy)
            self.health_checker.register(self.registry)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(f"mwapjobs:{name}")
        self._tasks.append(task)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until the engine runs (tests, embedding)."""
        await asyncio.wait_for(self._engine_up.wait(), timeout)

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
        for task in self._tasks:
            if task.get_name() == "mwapjobs:bring-up":
                task.cancel()
        if self.health_checker is not None:
            self.health_checker.interrupt()  # else a spread sweep holds the drain
        if self.engine.running:
            await self.engine.stop(timeout)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.alerts.stop()
        await self.loop_lag.stop()
        if self._runner is not None:
            await self._runner.cleanup()
        if self.http is not None:
            await self.http.close()
        if self.jwks is not None:
            await self.jwks.close()
        if self._owns_mongo:
            await self.mongo.aclose()
        log.info("stopped")

    # -- readiness -----------------------------------------------------------

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

    async def _ping(self) -> None:
        """Ping and record the outcome (the door records failures of its own queries)."""
        try:
            await self.mongo.ping(self.settings.mongodb.ping_timeout)
        except Exception as exc:
            if self.mongo.reachable:  # a failure the door did not see (an injected one)
                self.mongo.mark_down(exc)
            raise
        self.mongo.mark_up()

    async def _bring_up(self) -> None:
        """Connect and start the engine, retrying with capped exponential backoff."""
        delay = 1.0
        while not self.stopping:
            try:
                await self._ping()
                await self.integrations.ensure_indexes()
                await self.engine.start()
                self._engine_up.set()
                if self.refresh_sync is not None:
                    self._spawn(self.refresh_sync.run_forever(), "refresh-sync")
                if self.health_checker is not None:
                    self._spawn(self.health_checker.keep_scheduled(), "health-schedule")
                else:
                    self._spawn(unschedule(self.engine), "health-unschedule")
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("engine start failed; retrying",
                            extra={"error": f"{type(exc).__name__}: {exc}"[:300],
                                   "retryIn": delay})
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.mongodb.connect_retry_max)

    async def _watch_mongo(self) -> None:
        while True:
            await asyncio.sleep(self.settings.mongodb.ping_interval)
            with contextlib.suppress(Exception):  # recorded by _ping
                await self._ping()


def _signing_key(settings: Settings) -> bytes | None:
    """MWAPJOBS_SIGNING_KEY, else one derived from ENCRYPTION_KEY, else none."""
    secret = settings.signing_key or settings.encryption_key
    value = secret.get_secret_value() if secret else ""
    return signing_key(value) if value else None


async def run_until_signalled(daemon: Daemon) -> int:
    """Run `daemon` until SIGTERM/SIGINT, then stop gracefully and return 0.

    A second signal exits at once. Work is not lost even then: active runs
    keep their lease in MongoDB until it expires, and the next start requeues
    them.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    quitting: list[asyncio.Task[None]] = []

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            if not quitting:
                quitting.append(asyncio.ensure_future(_quit(daemon, sig)))
            return
        log.info("signal received", extra={"signal": sig.name})
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    await daemon.start()
    await stop.wait()
    await daemon.stop()
    return 0


async def _quit(daemon: Daemon, sig: signal.Signals) -> None:
    """A second signal: hand the running jobs back to their queues (for at most
    QUIT_RELEASE_SECONDS) and exit 1. They run again at once elsewhere or after the
    restart; nothing counts this as a crash."""
    released: int | str = 0
    try:
        released = await asyncio.wait_for(daemon.engine.release_all(), QUIT_RELEASE_SECONDS)
    except Exception as exc:
        released = f"not released ({type(exc).__name__}); they run again after their lease"
    log.error("second signal: exiting now", extra={"signal": sig.name, "released": released})
    stop_logging()
    os._exit(1)
