"""Prometheus metrics for one daemon, on its own `CollectorRegistry`.

Each `Daemon` owns a `DaemonMetrics` and its registry (never prometheus_client's
global default one), so several daemons in one process, as in the tests, do
not clash. Two kinds of metric live here:

- event-driven counters and a histogram, fed by the engine's events
  (`Engine.subscribe`): attempts by outcome, failures by kind, retries,
  stalls and run durations. They count what *this process* ran, from its start;
- scrape-time values, read when /metrics is scraped: runs per queue and state
  (`Operations.stats()`), readiness, MongoDB and scheduler state, event-loop lag
  and database round trips.

Jobs add their own: counters on `registry` (they subscribe to the engine
themselves), and scrape-time *sources* (`add_source`) read from MongoDB. What needs
MongoDB is gathered asynchronously first (`collect_async`), with a timeout and
without raising, and only then rendered synchronously by `render`: rendering never
does I/O. When a source cannot be read, its families are left empty and
`mwapjobs_metrics_source_up{source}` says 0 (so nothing is dropped silently).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from .engine import Engine
from .loopmon import LoopLagMonitor
from .operations import Operations
from .storage.mongo import Mongo
from .timeouts import within

log = logging.getLogger(__name__)

# The text format `generate_latest` writes (prometheus_client >= 0.22 calls this
# CONTENT_TYPE_PLAIN_0_0_4; its CONTENT_TYPE_LATEST names a newer version).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

QUEUE_STATES = ("waiting", "active", "delayed", "completed", "failed", "paused")
ATTEMPT_OUTCOMES = ("completed", "failed", "retrying")
FAILURE_KINDS = ("transient", "permanent", "deadline", "timeout", "stalled")
LAG_STATS = (("p50", 0.5), ("p99", 0.99))
# Runs are seconds to minutes; token refreshes well under a second.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 120.0, 300.0, 600.0, float("inf"))


def failure_kind(run: dict[str, Any]) -> str:
    """Why a run failed for good, from a `failed` event's error document.

    `deadline`: its deadline left no time for another attempt; `permanent`: the
    handler raised PermanentError; `timeout`: the last attempt timed out;
    `transient`: attempts used up on other errors.
    """
    error = run.get("error") or {}
    if error.get("deadlineExceeded"):
        return "deadline"
    if error.get("permanent"):
        return "permanent"
    if error.get("type") == "TimeoutError":
        return "timeout"
    return "transient"


@dataclass(frozen=True)
class Source:
    """A scrape-time value read from MongoDB: `read()` gathers it, `families(value)`
    renders it (value is None when the read failed)."""

    name: str
    read: Callable[[], Awaitable[Any]]
    families: Callable[[Any], list[Metric]]


class _ScrapeCollector(Collector):
    """Yields the scrape-time families from the last snapshot."""

    def __init__(self, metrics: DaemonMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics._scrape_families()


class DaemonMetrics:
    """The daemon's metrics: create once per daemon; it subscribes to the engine itself."""

    def __init__(self, engine: Engine, operations: Operations, mongo: Mongo,
                 loop_lag: LoopLagMonitor, ready: Callable[[], bool], *,
                 source_timeout: float = 5.0) -> None:
        self.engine = engine
        self.operations = operations
        self.mongo = mongo
        self.loop_lag = loop_lag
        self.ready = ready
        # auto_describe off: the scrape collector must not run before the daemon is built.
        self.registry = CollectorRegistry()
        self.source_timeout = source_timeout
        self.sources: list[Source] = [Source("queue_stats", self._queue_stats,
                                             self._queue_families)]
        self._snapshot: dict[str, Any] = {}
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r = self.registry

        self.attempts = Counter(
            "mwapjobs_run_attempts", "Run attempts finished by this process, by outcome.",
            ["queue", "outcome"], registry=r)
        self.failures = Counter(
            "mwapjobs_run_failures",
            "Runs that failed for good, by kind: transient (attempts used up), permanent, "
            "deadline, timeout, stalled (stalled too often).",
            ["queue", "kind"], registry=r)
        self.retries = Counter(
            "mwapjobs_run_retries", "Failed attempts rescheduled for a retry.", ["queue"],
            registry=r)
        self.stalled = Counter(
            "mwapjobs_run_stalled",
            "Runs found with an expired lease (their process died), by where they went.",
            ["queue", "moved_to"], registry=r)
        self.durations = Histogram(
            "mwapjobs_run_duration_seconds", "Duration of completed runs' last attempt.",
            ["queue"], buckets=DURATION_BUCKETS, registry=r)
        self.registry.register(_ScrapeCollector(self))
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)  # registers nothing where gc has no stats (not CPython)
        self.unsubscribe = engine.subscribe(self.on_event)

    # -- engine events -----------------------------------------------------------

    def on_event(self, event: str, run: dict[str, Any]) -> None:
        """Count one engine event. Synchronous and I/O-free: it runs inside `_record`."""
        queue = str(run.get("queue") or "")
        if event == "stalled":
            moved_to = str(run.get("movedTo") or "unknown")
            self._child(self.stalled, queue, moved_to).inc()
            if moved_to == "failed":
                self._child(self.failures, queue, "stalled").inc()
            return
        if event not in ATTEMPT_OUTCOMES:
            return
        self._child(self.attempts, queue, event).inc()
        duration_ms = run.get("durationMs")
        if isinstance(duration_ms, int | float):  # every attempt, failed ones included
            self._child(self.durations, queue).observe(duration_ms / 1000)
        if event == "retrying":
            self._child(self.retries, queue).inc()
        elif event == "failed":
            self._child(self.failures, queue, failure_kind(run)).inc()

    def _child(self, metric: Any, *values: str) -> Any:
        """`metric.labels(*values)`, looked up once: prometheus_client takes a lock and
        checks the values at every call, twice per run in a burst. (No label set is
        ever removed from these families, so a child once made stays theirs.)"""
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def _init_labels(self) -> None:
        """Make every known series exist (at 0) before its first event, so rates and
        alerts see a zero rather than nothing."""
        for queue in self.engine.registry.names():
            for outcome in ATTEMPT_OUTCOMES:
                self.attempts.labels(queue, outcome)
            for kind in FAILURE_KINDS:
                self.failures.labels(queue, kind)
            self.retries.labels(queue)
            for moved_to in ("waiting", "failed"):
                self.stalled.labels(queue, moved_to)
            self.durations.labels(queue)

    # -- scraping ------------------------------------------------------------------

    async def _read(self, name: str, source: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await within(source(), self.source_timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("metrics source failed", extra={
                "source": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
            return None

    def add_source(self, source: Source) -> None:
        """A job's scrape-time value (read from MongoDB at each scrape)."""
        self.sources.append(source)

    async def _queue_stats(self) -> Any:
        if not self.engine.running:
            raise RuntimeError("the engine is not running")
        return await self.operations.stats()

    async def collect_async(self) -> None:
        """Read every source (concurrently) for the next `render`."""
        if not self.mongo.reachable or self.mongo.closed:
            self._snapshot = {}
            return
        values = await asyncio.gather(*(self._read(s.name, s.read) for s in self.sources))
        self._snapshot = {s.name: v for s, v in zip(self.sources, values, strict=True)}

    def render(self) -> bytes:
        """The exposition text. Synchronous and I/O-free."""
        self._init_labels()
        return generate_latest(self.registry)

    async def exposition(self) -> bytes:
        """Gather, then render: what GET /metrics answers. No await between the two,
        so concurrent scrapes never see each other's half-taken snapshot."""
        await self.collect_async()
        return self.render()

    def _queue_families(self, stats: Any) -> list[Metric]:
        queue_runs = GaugeMetricFamily(
            "mwapjobs_queue_runs", "Runs per queue and state, at scrape time.",
            labels=["queue", "state"])
        queue_paused = GaugeMetricFamily(
            "mwapjobs_queue_paused", "1 if the queue is paused.", labels=["queue"])
        for queue, counts in (stats or {}).items():
            for state in QUEUE_STATES:
                queue_runs.add_metric([queue, state], float(counts.get(state, 0)))
            queue_paused.add_metric([queue], 1.0 if counts.get("isPaused") else 0.0)
        return [queue_runs, queue_paused]

    def _scrape_families(self) -> list[Metric]:
        snapshot = self._snapshot
        families: list[Metric] = []
        up = GaugeMetricFamily(
            "mwapjobs_metrics_source_up",
            "1 if this scrape could read the source (queue_stats, and what jobs add).",
            labels=["source"])
        for source in self.sources:
            value = snapshot.get(source.name)
            families.extend(source.families(value))
            up.add_metric([source.name], 0.0 if value is None else 1.0)

        lag = GaugeMetricFamily(
            "mwapjobs_event_loop_lag_seconds",
            "Event-loop lag over the recent window (p50, p99, max).", labels=["stat"])
        for name, q in LAG_STATS:
            lag.add_metric([name], self.loop_lag.percentile(q))
        lag.add_metric(["max"], max(self.loop_lag.samples, default=0.0))

        round_trips = CounterMetricFamily(
            "mwapjobs_db_round_trips",
            "Queries sent to MongoDB, by client: app (motor) and scheduler (APScheduler's "
            "job store).",
            labels=["client"])
        round_trips.add_metric(["app"], float(self.mongo.round_trips))
        round_trips.add_metric(["scheduler"], float(self.engine.scheduler.round_trips))

        return [
            *families, up, lag, round_trips,
            _gauge("mwapjobs_ready", "1 if /readyz would answer 200.", self.ready()),
            _gauge("mwapjobs_scheduler_up", "1 if the engine (and its clock, on the leader) "
                   "are running.", self.engine.running),
            _gauge("mwapjobs_leader", "1 if this instance holds the leader lease (it runs "
                   "the clock of repeats, discovery and alert evaluation).",
                   self.engine.leadership.leading),
            _gauge("mwapjobs_mongodb_up", "1 if the last MongoDB ping or query succeeded.",
                   self.mongo.reachable),
            _gauge("mwapjobs_active_runs", "Runs executing in this process now.",
                   self.engine.active_count),
        ]


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=float(value))
