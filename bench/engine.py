"""Engine benchmark: the daemon's queue engine beside bare APScheduler, in the same run.

Four suites (``--suite``: burst by default, or a comma-separated list, or ``all``),
each scenario in a fresh process so that peak RSS, threads and the GIL of one cannot
pollute another:

- ``burst``: N jobs (``--jobs``, default 10,000) due at one instant T.
- ``spread``: ``--spread-jobs`` (300) due one after the other over ``--spread-seconds``
  (30), evenly.
- ``adds``: ``--adds`` (100,000) delayed runs added, due at random over the next day,
  with the clock running: adds per second and peak RSS.
- ``stats``: ``Operations.stats()`` and a ``/metrics`` scrape timed with
  ``--history`` finished runs in the store (default 1,000 and 1,000,000).

The contenders:

- ``engine``: the full daemon (`Daemon`, default settings; token refresh and health
  checks off, they need MWAP's data), one queue ``bench`` with a trivial async handler
  and concurrency ``--concurrency`` (200). Jobs are added with ``engine.add(run_at=...)``
  from the daemon's loop, 200 at a time, while everything runs (the clock included).
- ``aps_mongo_fair`` / ``aps_mongo_default``: a bare ``AsyncIOScheduler`` with
  APScheduler's own ``MongoDBJobStore`` on the same store, running while jobs are added
  (``add_job(..., "date")``, the loop yields every 200 adds), one date job per job.
  *fair*: ``misfire_grace_time=None, coalesce=True`` (a late job still runs, as in the
  engine); *default*: APScheduler's defaults (``misfire_grace_time=1``: a job more than
  1 s late is dropped as missed).
- ``aps_memory_fair`` / ``aps_memory_default``: the same with ``MemoryJobStore``
  (nothing persisted: not a replacement for the engine, the in-process upper bound).

Figures (all from the same run; the table prints engine / baseline ratios):

- lateness p50/p99/max: handler start minus the job's due time, seconds;
- jobs_per_s: jobs finished / (last finish - first due); the engine's "finished"
  means its completed state was written;
- ran / missed: APScheduler's misses are its EVENT_JOB_MISSED; the engine's are jobs
  that did not complete before the timeout;
- loop lag max/p99: a task sleeping 10 ms on the loop, how late it woke, during the
  burst (from 0.3 s before T to the last finish; ``add_max_loop_lag_ms`` while adding);
  for spread and adds over the whole scenario;
- healthz p99/max: a separate process GETs ``/healthz`` (the daemon's, or an
  equivalent aiohttp route on the baseline's loop) every 20 ms, new connection each
  time, during the same window;
- round trips per job over its whole life: every query counted from before the first
  add to after the last outcome was written and the finished counters flushed
  (1.2 s later), background loops included. Engine: ``Mongo.round_trips``
  (application) + ``engine.scheduler.round_trips`` (its APScheduler job store); on a
  server also ``wire_commands_per_job``, every command the drivers sent (getMore and
  pings included). Baselines: every query of the MongoDBJobStore (command monitoring
  on a server, calls into the collection on mongomock);
- gc pauses: every garbage collection during the burst, from ``gc.callbacks``
  (count, median, max; a collection stops every thread);
- peak_rss_mb: the scenario process's ``ru_maxrss``;
- stats: median/p99 ms of ``Operations.stats()`` and of ``GET /metrics`` (20 each),
  beside a naive count of the finished runs (``count_documents`` per finished state,
  what the stats cost before the counters) in the same process.

Store-bound figures (marked ``*``): lateness, jobs/s, adds/s and stats times are set
by how fast the store answers a query (mongomock runs each one as Python code in this
process, on its own thread; the wire server is a Python process too). Round trips are
counted, not timed, and carry over to any store.

    python bench/engine.py                      # burst, 10,000 jobs (about 4 minutes)
    python bench/engine.py --repeat 3           # the loop-lag target wants 3 runs in a row
    python bench/engine.py --suite spread       # about 3 minutes; adds: 2; stats: 3
    python bench/engine.py --suite all --repeat 3 --save report.json   # everything, ~14 min
    python bench/engine.py --suite all --uri mongodb://127.0.0.1:27999 --jobs 2000 \\
        --adds 10000 --history 1000,100000      # the wire lane, at sizes it bears
    python bench/engine.py --jobs 2000 --json
    python bench/engine.py --child burst:engine --jobs 2000 --profile   # where time goes

``--profile`` (with ``--child``) samples every thread's stack during the burst and
records the loop thread's stack while it is stalled; to stderr.
A scenario that fails or hangs leaves its stderr in ``$TMPDIR/mwapjobs-bench-*.stderr``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import sys
import threading
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import benchlib
from benchlib import (
    GcPauses,
    LagMonitor,
    Prober,
    Store,
    emit,
    fmt,
    ms,
    percentile,
    ratio,
    say,
    verdict,
)

SUITES = ("burst", "spread", "adds", "stats")
BASELINES = ("aps_mongo_fair", "aps_mongo_default", "aps_memory_fair", "aps_memory_default")
FAIR = "aps_mongo_fair"
BATCH = 200  # adds per gather (engine) / between yields (APScheduler)
STORE_BOUND = {"p50_lateness_ms", "p99_lateness_ms", "max_lateness_ms", "jobs_per_s",
               "adds_per_s", "add_s", "stats_median_ms", "stats_p99_ms",
               "metrics_median_ms", "metrics_p99_ms", "naive_count_median_ms"}
TARGETS = {
    "burst_loop_lag_ms": 50.0,  # max, in each of 3 consecutive runs
    "healthz_p99_ms": 50.0,
    "embedded_p99_lateness_ms": 2000.0,
    "wire_lateness_vs_fair": 2.0,  # engine p99 lateness <= 2x aps_mongo_fair's
    "wire_lag_vs_fair": 1 / 20,  # engine max loop lag < 1/20 of aps_mongo_fair's
    "burst_round_trips_per_job": 3.0,
    "spread_round_trips_per_job": 4.0,
    "gc_pause_ms": 20.0,
    "adds_per_s": 1000.0,
    "adds_peak_rss_mb": 300.0,
    "stats_ms": 50.0,
    "stats_growth": 10.0,  # wire server: large / small history, "the same order"
}


def when(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


# -- what a scenario records ------------------------------------------------------------


class Record:
    """Starts and finishes of one scenario, and the counters around them. Thread-safe
    enough for the watchdog, which reads it from another thread."""

    def __init__(self, n: int, timeout_at: float) -> None:
        self.n = n
        self.phase = "setting up"
        self.lateness: list[float] = []
        self.finishes: list[float] = []
        self.missed = 0
        self.first_due: float | None = None
        self.window_start = time.time()
        self.lag = LagMonitor()
        self.gc = GcPauses()
        self.prober: Prober | None = None
        self.extra: dict[str, Any] = {}
        self.trips: Callable[[], dict[str, int]] = dict
        self.trips_before: dict[str, int] = {}
        self.trips_after: dict[str, int] | None = None
        self.timeout_at = timeout_at
        self._dog = threading.Timer(max(1.0, timeout_at + 20 - time.time()), self._bark)
        self._dog.daemon = True
        self._dog.start()

    def started(self, due: float) -> None:
        self.lateness.append(time.time() - due)

    def finished(self) -> None:
        self.finishes.append(time.time())

    def begin_counting(self) -> None:
        self.trips_before = self.trips()

    def _bark(self) -> None:
        emit(self.summary(timed_out=True))
        os._exit(0)

    def summary(self, timed_out: bool = False) -> dict[str, Any]:
        self._dog.cancel()
        ran = len(self.finishes)
        span = (max(self.finishes) - self.first_due) if self.finishes and self.first_due \
            else None
        out: dict[str, Any] = {
            "n": self.n, "ran": ran, "missed": self.missed,
            "unfinished": self.n - ran - self.missed,
            "p50_lateness_ms": ms(percentile(self.lateness, 0.5)),
            "p99_lateness_ms": ms(percentile(self.lateness, 0.99)),
            "max_lateness_ms": ms(max(self.lateness, default=None)),
            "jobs_per_s": round(ran / span, 1) if span and span > 0 else None,
            **self.lag.summary(since=self.window_start),
            **self.gc.summary(since=self.window_start),
            "peak_rss_mb": benchlib.peak_rss_mb(),
            "timed_out": timed_out,
        }
        if timed_out:
            out["timed_out_in"] = self.phase
        if self.prober is not None:
            out.update(self.prober.stop())
            self.prober = None
        after = self.trips_after or self.trips()
        if self.trips_before or after:
            per = max(ran + self.missed, 1)
            for key, value in after.items():
                delta = value - self.trips_before.get(key, 0)
                out[f"{key}_round_trips"] = delta
            app = out.get("app_round_trips", 0) + out.get("scheduler_round_trips", 0)
            out["round_trips_per_job"] = round(app / per, 3)
            if "wire_round_trips" in out:
                out["wire_commands_per_job"] = round(out.pop("wire_round_trips") / per, 3)
        return {**out, **self.extra}


# -- the engine ---------------------------------------------------------------------------


async def start_daemon(store: Store, record: Record, concurrency: int) -> Any:
    from mwapjobs.config import Settings
    from mwapjobs.daemon import Daemon

    settings = Settings(mongodb_uri=store.settings_uri(), log_level="error",
                        http={"host": "127.0.0.1", "port": 0},
                        refresh={"enabled": False}, health={"enabled": False})
    daemon = Daemon(settings, mongo=store.mongo)

    async def handler(job: Any) -> None:
        record.started(float(job.data["due"]))

    def on_event(event: str, _run: dict[str, Any]) -> None:
        if event == "completed":
            record.finished()

    daemon.registry.register("bench", handler, concurrency=concurrency, attempts=1)
    await daemon.start()
    await daemon.wait_ready(120)
    daemon.engine.subscribe(on_event)

    def trips() -> dict[str, int]:
        counts = {"app": store.mongo.round_trips,
                  "scheduler": daemon.engine.scheduler.round_trips}
        if store.wire is not None:
            counts["wire"] = store.wire.total
        return counts

    record.trips = trips
    return daemon


async def engine_add(daemon: Any, dues: list[float], record: Record,
                     budget: float | None = None) -> int:
    """Add one run per due time, BATCH at a time; stops at `budget` seconds."""
    engine = daemon.engine
    began = time.time()
    for start in range(0, len(dues), BATCH):
        chunk = dues[start:start + BATCH]
        await asyncio.gather(*(engine.add("bench", {"due": d}, run_at=when(d)) for d in chunk))
        if budget is not None and time.time() - began > budget:
            return start + len(chunk)
    return len(dues)


async def wait_for(done: Callable[[], bool], deadline: float) -> bool:
    while not done():
        if time.time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def engine_jobs(args: argparse.Namespace, suite: str) -> dict[str, Any]:
    """burst or spread, on the daemon."""
    store = Store(args.uri, suite)
    n = args.jobs if suite == "burst" else args.spread_jobs
    record = Record(n, time.time() + args.lead + args.timeout + 60)
    try:
        daemon = await start_daemon(store, record, args.concurrency)
        record.gc.start()
        record.lag.start()
        record.prober = Prober(f"http://127.0.0.1:{daemon.port}/healthz")
        await record.prober.ready()
        record.phase = "adding"
        record.begin_counting()
        began = time.time()
        first = began + args.lead
        dues = [first] * n if suite == "burst" else \
            [first + i * args.spread_seconds / max(n - 1, 1) for i in range(n)]
        record.first_due = first
        await engine_add(daemon, dues, record)
        added = time.time()
        record.extra.update(add_s=round(added - began, 2), slack_s=round(first - added, 2),
                            **record.lag.summary(since=began, prefix="add_"))
        if suite == "burst":
            await asyncio.sleep(max(0.0, first - 0.3 - time.time()))
            record.window_start = time.time()
            record.prober.reset()
            if SAMPLER:
                SAMPLER.start(record.lag)
        else:
            record.window_start = began
        record.phase = "running"
        finished = await wait_for(lambda: len(record.finishes) >= n,
                                  first + (args.spread_seconds if suite == "spread" else 0)
                                  + args.timeout)
        record.extra["window_end"] = time.time()
        snapshot = record.summary(timed_out=not finished)  # lag and gc up to the last finish
        await asyncio.sleep(1.2)  # the finished counters are flushed every second
        record.trips_after = record.trips()
        counted = record.summary(timed_out=not finished)
        for key in ("app_round_trips", "scheduler_round_trips", "round_trips_per_job",
                    "wire_commands_per_job"):
            if key in counted:
                snapshot[key] = counted[key]
        snapshot["store"] = store.label
        return snapshot
    finally:
        store.drop()


# -- APScheduler -----------------------------------------------------------------------------

RECORD: Record | None = None  # for the job function, which MongoDBJobStore stores by name


async def aps_job(due: float) -> None:
    assert RECORD is not None
    RECORD.started(due)
    RECORD.finished()


def aps_scheduler(kind: str, store: Store) -> tuple[Any, Callable[[], int] | None]:
    from apscheduler.jobstores.memory import MemoryJobStore
    from apscheduler.schedulers.asyncio import AsyncIOScheduler

    if kind.startswith("aps_mongo"):
        jobstore, trips = benchlib.aps_mongo_store(store)
    else:
        jobstore, trips = MemoryJobStore(), None
    defaults = {"misfire_grace_time": None, "coalesce": True} if kind.endswith("_fair") else {}
    scheduler = AsyncIOScheduler(jobstores={"default": jobstore}, job_defaults=defaults,
                                 timezone=UTC)
    return scheduler, trips


async def aps_add(scheduler: Any, dues: list[float], budget: float | None) -> int:
    began = time.time()
    for i, due in enumerate(dues):
        scheduler.add_job(aps_job, "date", run_date=when(due), args=[due], id=f"job-{i}")
        if i % BATCH == BATCH - 1:
            await asyncio.sleep(0)  # the wake-ups each add asked for run here
            if budget is not None and time.time() - began > budget:
                return i + 1
    await asyncio.sleep(0)
    return len(dues)


async def aps_jobs(args: argparse.Namespace, suite: str, kind: str) -> dict[str, Any]:
    global RECORD
    from apscheduler.events import EVENT_JOB_MISSED

    store = Store(args.uri, suite)
    n = args.jobs if suite == "burst" else args.spread_jobs
    record = RECORD = Record(n, time.time() + args.lead + args.timeout + args.add_budget + 60)
    try:
        port = await benchlib.healthz_server()
        scheduler, trips = aps_scheduler(kind, store)

        def on_missed(_event: Any) -> None:
            record.missed += 1

        scheduler.add_listener(on_missed, EVENT_JOB_MISSED)
        scheduler.start()  # running while adding, as the engine's clock is
        if trips is not None:
            record.trips = lambda: {"scheduler": trips()}
        record.gc.start()
        record.lag.start()
        record.prober = Prober(f"http://127.0.0.1:{port}/healthz")
        await record.prober.ready()
        record.phase = "adding"
        record.begin_counting()
        began = time.time()
        first = began + args.lead
        dues = [first] * n if suite == "burst" else \
            [first + i * args.spread_seconds / max(n - 1, 1) for i in range(n)]
        record.first_due = first
        added_n = await aps_add(scheduler, dues, args.add_budget)
        added = time.time()
        if added_n < n:
            rate = added_n / (added - began)
            say(f"{suite}:{kind}: adding stopped at the budget: {added_n} of {n}")
            return {"error": f"adding did not finish within --add-budget {args.add_budget:g} s: "
                             f"{added_n:,} of {n:,} added ({rate:,.0f} adds/s, with the "
                             "scheduler running)", "skipped": "add budget",
                    "adds_per_s": round(rate, 1), "store": store.label}
        record.extra.update(add_s=round(added - began, 2), slack_s=round(first - added, 2),
                            **record.lag.summary(since=began, prefix="add_"))
        if suite == "burst":
            await asyncio.sleep(max(0.0, first - 0.3 - time.time()))
            record.window_start = time.time()
            record.prober.reset()
        else:
            record.window_start = began
        record.phase = "running"
        finished = await wait_for(lambda: len(record.finishes) + record.missed >= n,
                                  first + (args.spread_seconds if suite == "spread" else 0)
                                  + args.timeout)
        record.extra["window_end"] = time.time()
        snapshot = record.summary(timed_out=not finished)
        snapshot["store"] = store.label if kind.startswith("aps_mongo") else "memory"
        return snapshot
    finally:
        store.drop()


# -- adds: 100,000 delayed runs over a day, with the clock running -----------------------------


async def adds_scenario(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    global RECORD
    store = Store(args.uri, "adds")
    n = args.adds
    record = RECORD = Record(n, time.time() + args.adds_budget + 300)
    rng = random.Random(7)
    try:
        if kind == "engine":
            daemon = await start_daemon(store, record, args.concurrency)
            port = daemon.port
            scheduler = None
        else:
            daemon = None
            port = await benchlib.healthz_server()
            scheduler, trips = aps_scheduler(kind, store)
            scheduler.start()
            if trips is not None:
                record.trips = lambda: {"scheduler": trips()}
        rss_before = benchlib.rss_mb()
        record.gc.start()
        record.lag.start()
        record.prober = Prober(f"http://127.0.0.1:{port}/healthz")
        await record.prober.ready()
        record.prober.reset()
        record.begin_counting()
        now = time.time()
        dues = [now + rng.uniform(60, 86_400) for _ in range(n)]
        record.phase = "adding"
        record.window_start = began = time.time()
        if daemon is not None:  # no budget: the figure is the time all of them take
            added = await engine_add(daemon, dues, record)
        else:
            added = await aps_add(scheduler, dues, args.adds_budget)
        elapsed = time.time() - began
        out = record.summary(timed_out=False)
        for key in ("ran", "missed", "unfinished", "p50_lateness_ms", "p99_lateness_ms",
                    "max_lateness_ms", "jobs_per_s", "timed_out"):
            out.pop(key, None)
        trips_total = out.get("app_round_trips", 0) + out.get("scheduler_round_trips", 0)
        out.update(added=added, adds_per_s=round(added / elapsed, 1), add_s=round(elapsed, 2),
                   rss_before_mb=rss_before, rss_after_mb=benchlib.rss_mb(),
                   round_trips_per_job=round(trips_total / max(added, 1), 3),
                   complete=added == n,
                   store=store.label if kind != "aps_memory_fair" else "memory")
        if daemon is not None:
            delayed = await daemon.engine.runs.count("bench", "delayed")
            out["delayed_in_store"] = delayed
        return out
    finally:
        store.drop()


# -- stats and /metrics against history -------------------------------------------------------


def history_docs(start: int, count: int, now: datetime) -> list[dict[str, Any]]:
    from bson import ObjectId

    docs = []
    for i in range(start, start + count):
        finished = now - timedelta(seconds=i * 0.05)
        failed = i % 10 == 9
        docs.append({
            "_id": ObjectId(), "queue": "bench", "jobId": None, "data": {"i": i},
            "state": "failed" if failed else "completed", "priority": 0,
            "runAt": finished - timedelta(seconds=1), "attemptsMade": 1, "maxAttempts": 1,
            "backoff": {"type": "fixed", "delay": 1.0}, "timeout": None, "deadline": None,
            "createdAt": finished - timedelta(seconds=2), "startedAt": finished,
            "finishedAt": finished, "durationMs": 1.5, "isolate": False,
            "result": None if failed else {"ok": True},
            "error": {"message": "boom", "type": "RuntimeError", "permanent": False}
            if failed else None,
            "attempts": [{"attempt": 1, "startedAt": finished, "finishedAt": finished,
                          "durationMs": 1.5, "outcome": "failed" if failed else "completed"}],
        })
    return docs


async def timed(fn: Callable[[], Any], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t0)
    return out


async def stats_scenario(args: argparse.Namespace, history: int) -> dict[str, Any]:
    import aiohttp

    from mwapjobs.storage.runs import RunStore

    store = Store(args.uri, "stats")
    record = Record(0, time.time() + 3600)
    try:
        runs = RunStore(store.mongo)
        await runs.ensure_indexes()
        now = datetime.now(UTC)
        t0 = time.time()
        batch = 10_000
        for start in range(0, history, batch):
            docs = history_docs(start, min(batch, history - start), now)
            await store.mongo.call(lambda db, docs=docs: db[benchlib.RUNS].insert_many(docs))
        pending = [{**d, "state": "delayed", "runAt": now + timedelta(hours=1),
                    "finishedAt": None, "attempts": [], "attemptsMade": 0}
                   for d in history_docs(history, 1000, now)]
        await store.mongo.call(lambda db: db[benchlib.RUNS].insert_many(pending))
        insert_s = time.time() - t0
        say(f"stats: {history:,} finished runs inserted in {insert_s:.0f} s")
        daemon = await start_daemon(store, record, args.concurrency)
        expected_failed = history // 10
        url = f"http://127.0.0.1:{daemon.port}/metrics"
        async with aiohttp.ClientSession() as http:
            async def scrape() -> None:
                async with http.get(url) as resp:
                    body = await resp.read()
                    assert resp.status == 200, resp.status
                    assert b"mwapjobs_queue_runs" in body

            stats = await daemon.operations.stats()
            await scrape()  # warm-up
            stats_s = await timed(daemon.operations.stats, args.stats_repeat)
            metrics_s = await timed(scrape, args.stats_repeat)

        async def naive() -> None:
            for state in ("completed", "failed"):
                await store.mongo.call(lambda db, s=state: db[benchlib.RUNS].count_documents(
                    {"queue": "bench", "state": s}))

        naive_s = await timed(naive, max(3, args.stats_repeat // 4))
        bench = stats["bench"]
        return {
            "history": history, "insert_s": round(insert_s, 1),
            "stats_median_ms": ms(percentile(stats_s, 0.5)),
            "stats_p99_ms": ms(percentile(stats_s, 0.99)),
            "metrics_median_ms": ms(percentile(metrics_s, 0.5)),
            "metrics_p99_ms": ms(percentile(metrics_s, 0.99)),
            "naive_count_median_ms": ms(percentile(naive_s, 0.5)),
            "counts_right": bench["completed"] == history - expected_failed
            and bench["failed"] == expected_failed and bench["delayed"] == 1000,
            "counts": bench, "peak_rss_mb": benchlib.peak_rss_mb(), "store": store.label,
        }
    finally:
        store.drop()


# -- profiling (--profile) -------------------------------------------------------------------

STALL = 0.05
PROJECTS = ("mwapjobs", "apscheduler", "mongomock", "asyncio", "aiohttp", "pymongo", "motor")
IDLE = {"select", "wait", "_worker", "accept", "readinto", "poll", "recv_into"}


class Sampler:
    """Samples every thread's stack every 5 ms; reports busy frames per thread, and the
    loop thread's stack while the loop is stalled (over STALL s late)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.owned: collections.Counter[tuple[str, str]] = collections.Counter()
        self.leaf: collections.Counter[tuple[str, str]] = collections.Counter()
        self.busy: collections.Counter[str] = collections.Counter()
        self.stalls: collections.Counter[str] = collections.Counter()
        self.lag: LagMonitor | None = None
        self.ticks = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self, lag: LagMonitor) -> None:
        self.lag = lag
        self._thread.start()

    def _run(self) -> None:
        me, main = threading.get_ident(), threading.main_thread().ident
        while not self._stop.wait(self.interval):
            self.ticks += 1
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                stack = traceback.extract_stack(frame)
                if ident == main and self.lag and self.lag.stall() > STALL:
                    self.stalls[" < ".join(f"{e.name} {Path(e.filename).name}:{e.lineno}"
                                           for e in reversed(stack[-6:]))] += 1
                if stack[-1].name in IDLE:
                    continue
                thread = names.get(ident, "?")
                self.busy[thread] += 1
                leaf = stack[-1]
                self.leaf[(thread, f"{leaf.name} {Path(leaf.filename).name}:{leaf.lineno}")] += 1
                for key in {(thread, f"{e.name} {Path(e.filename).name}")
                            for e in stack if any(p in e.filename for p in PROJECTS)}:
                    self.owned[key] += 1

    def report(self, top: int = 25) -> str:
        self._stop.set()
        lines = [f"-- {self.ticks} ticks of {self.interval * 1000:g} ms; busy ticks per thread --"]
        lines += [f"{c:6d}  {t}" for t, c in self.busy.most_common()]
        lines += [f"-- loop thread while the loop was stalled > {STALL * 1000:g} ms --"]
        lines += [f"{c:6d}  {s}" for s, c in self.stalls.most_common(12)]
        lines += ["-- inclusive samples, project frames --"]
        lines += [f"{c:6d}  {t:28.28s} {f}" for (t, f), c in self.owned.most_common(top)]
        lines += ["-- self samples (leaf frames) --"]
        lines += [f"{c:6d}  {t:28.28s} {f}" for (t, f), c in self.leaf.most_common(top)]
        return "\n".join(lines)


SAMPLER: Sampler | None = None


# -- the parent ------------------------------------------------------------------------------


def child_cmd(name: str, args: argparse.Namespace, **override: Any) -> list[str]:
    values = {**vars(args), **override}
    cmd = [sys.executable, __file__, "--child", name]
    for flag in ("jobs", "spread_jobs", "spread_seconds", "adds", "concurrency", "timeout",
                 "lead", "add_budget", "adds_budget", "stats_repeat"):
        if values.get(flag) is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(values[flag])]
    if values.get("uri"):
        cmd += ["--uri", values["uri"]]
    if values.get("history_one") is not None:
        cmd += ["--history", str(values["history_one"])]
    return cmd


def default_lead(args: argparse.Namespace, suite: str, kind: str) -> float:
    """Seconds from the first add to the first due time: adding must be over by then."""
    n = args.jobs if suite == "burst" else args.spread_jobs
    if kind == "engine":
        rate = 1500.0 if args.uri is None else 60.0
    elif kind.startswith("aps_memory"):
        rate = 20_000.0
    elif args.uri is None:  # mongomock, no index for it: every add's wake-up scans the store
        return round(2.0 + n / 300 + 7e-6 * n * n, 1)
    else:
        rate = 30.0
    return round(2.0 + n / rate, 1)


def run_jobs_suite(args: argparse.Namespace, suite: str) -> dict[str, Any]:
    results: dict[str, Any] = {}
    engine_runs: list[dict[str, Any]] = []
    for kind in ["engine", *args.baselines]:
        if kind.startswith("aps_mongo") and kind != FAIR and args.uri is None \
                and results.get(FAIR, {}).get("skipped"):
            results[kind] = {**results[FAIR]}  # the same add path: it would not finish either
            continue
        repeats = args.repeat if suite == "burst" and kind == "engine" else 1
        lead = args.lead
        for _ in range(repeats):
            results[kind] = run_with_lead(args, suite, kind, lead)
            lead = results[kind]["lead_s"]  # what worked, for the next repeat
            if kind == "engine":
                engine_runs.append(results[kind])
    results["engine_runs"] = engine_runs
    return results


def run_with_lead(args: argparse.Namespace, suite: str, kind: str,
                  lead: float | None) -> dict[str, Any]:
    """One scenario; again with a longer lead if adding overran the first due time."""
    lead = lead if lead is not None else default_lead(args, suite, kind)
    result: dict[str, Any] = {}
    for _try in range(3):
        hard = lead + args.timeout + args.add_budget + 240 + (
            args.spread_seconds if suite == "spread" else 0)
        result = benchlib.run_child(child_cmd(f"{suite}:{kind}", args, lead=lead),
                                    f"{suite}:{kind}", hard)
        slack = result.get("slack_s")
        if slack is None or slack >= 0.5:
            break
        lead = round(max(lead, result["add_s"]) * 1.3 + 3, 1)
        say(f"{suite}:{kind}: adding overran the due time; again with --lead {lead}")
    result["lead_s"] = lead
    return result


def run_adds_suite(args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for kind in ("engine", "aps_mongo_fair", "aps_memory_fair"):
        out[kind] = benchlib.run_child(child_cmd(f"adds:{kind}", args), f"adds:{kind}",
                                       args.adds_budget + 600)
    return out


def run_stats_suite(args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for size in args.history:
        out[str(size)] = benchlib.run_child(child_cmd("stats:engine", args, history_one=size),
                                            f"stats:{size}", 1800)
    return out


# -- verdicts ------------------------------------------------------------------------------------


def num(d: dict[str, Any], key: str) -> float | None:
    value = d.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else None


def targets(report: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    """(what, PASS/FAIL/None for not measured, the numbers)."""
    t = TARGETS
    wire = report["uri"] is not None
    out: list[tuple[str, bool | None, str]] = []
    burst = report.get("burst")
    if burst:
        runs = burst.get("engine_runs") or [burst["engine"]]
        lags = [num(r, "max_loop_lag_ms") for r in runs]
        ok_lag = all(x is not None and x <= t["burst_loop_lag_ms"] for x in lags)
        out.append((f"burst: max loop lag <= {t['burst_loop_lag_ms']:g} ms in 3 consecutive runs",
                    (ok_lag if len(runs) >= 3 else (False if not ok_lag else None)),
                    f"{len(runs)} run(s): " + ", ".join(fmt(x) for x in lags) + " ms"
                    + ("" if len(runs) >= 3 else " (use --repeat 3)")))
        hz = [num(r, "healthz_p99_ms") for r in runs]
        out.append((f"burst: /healthz p99 <= {t['healthz_p99_ms']:g} ms",
                    all(x is not None and x <= t["healthz_p99_ms"] for x in hz),
                    ", ".join(fmt(x) for x in hz) + " ms"))
        late = [num(r, "p99_lateness_ms") for r in runs]
        ran = all(r.get("ran") == r.get("n") for r in runs)
        out.append(("burst: every job ran", ran,
                    ", ".join(f"{fmt(r.get('ran'))} of {fmt(r.get('n'))}" for r in runs)))
        if not wire:
            out.append((f"burst: p99 lateness <= {t['embedded_p99_lateness_ms'] / 1000:g} s "
                        "(embedded store)",
                        ran and all(x is not None and x <= t["embedded_p99_lateness_ms"]
                                    for x in late),
                        ", ".join(fmt(x) for x in late) + " ms"))
        else:
            fair = burst.get(FAIR) or {}
            f_late, f_lag = num(fair, "p99_lateness_ms"), num(fair, "max_loop_lag_ms")
            if f_late is None or f_lag is None:
                out.append(("burst: lateness and loop lag vs the fair APScheduler baseline", None,
                            "baseline not measured"))
            else:
                out.append((f"burst: p99 lateness <= {t['wire_lateness_vs_fair']:g}x "
                            f"{FAIR}'s ({fmt(f_late)} ms)",
                            ran and all(x is not None and x <= t["wire_lateness_vs_fair"] * f_late
                                        for x in late),
                            ", ".join(f"{fmt(x)} ms ({ratio(x, f_late)})" for x in late)))
                out.append((f"burst: max loop lag < 1/20 of {FAIR}'s ({fmt(f_lag)} ms)",
                            all(x is not None and x < t["wire_lag_vs_fair"] * f_lag
                                for x in lags),
                            ", ".join(f"{fmt(x)} ms ({ratio(x, f_lag)})" for x in lags)))
        trips = [num(r, "round_trips_per_job") for r in runs]
        out.append((f"burst: round trips per job (whole life) <= "
                    f"{t['burst_round_trips_per_job']:g}",
                    all(x is not None and x <= t["burst_round_trips_per_job"] for x in trips),
                    ", ".join(fmt(x) for x in trips)))
        gcs = [(r.get("gc_over_20ms"), num(r, "gc_max_ms")) for r in runs]
        out.append((f"burst: no gc pause over {t['gc_pause_ms']:g} ms",
                    all(over == 0 for over, _ in gcs),
                    ", ".join(f"{fmt(over)} over, max {fmt(mx)} ms" for over, mx in gcs)))
    spread = report.get("spread")
    if spread:
        e = spread["engine"]
        x = num(e, "round_trips_per_job")
        out.append((f"spread: round trips per job (whole life) <= "
                    f"{t['spread_round_trips_per_job']:g}",
                    x is not None and x <= t["spread_round_trips_per_job"], fmt(x)))
        out.append(("spread: every job ran", e.get("ran") == e.get("n"),
                    f"{fmt(e.get('ran'))} of {fmt(e.get('n'))}"))
    adds = report.get("adds")
    if adds:
        e = adds["engine"]
        rate, rss = num(e, "adds_per_s"), num(e, "peak_rss_mb")
        label = "" if not wire else " (target set for the embedded store)"
        out.append((f"adds: >= {t['adds_per_s']:,.0f} adds/s{label}",
                    None if wire else (rate is not None and rate >= t["adds_per_s"]
                                       and bool(e.get("complete"))),
                    f"{fmt(rate)} adds/s, {fmt(e.get('added'))} added"))
        out.append((f"adds: peak RSS <= {t['adds_peak_rss_mb']:g} MB{label}",
                    None if wire else (rss is not None and rss <= t["adds_peak_rss_mb"]),
                    f"{fmt(rss)} MB"))
    stats = report.get("stats")
    if stats:
        sizes = sorted(stats, key=int)
        for metric in ("stats_median_ms", "metrics_median_ms"):
            values = [num(stats[s], metric) for s in sizes]
            shown = ", ".join(f"{fmt(v)} ms at {int(s):,}" for v, s in zip(values, sizes,
                                                                            strict=True))
            what = "Operations.stats()" if metric.startswith("stats") else "/metrics scrape"
            if not wire:
                out.append((f"stats: {what} median < {t['stats_ms']:g} ms",
                            all(v is not None and v < t["stats_ms"] for v in values), shown))
            else:
                ok = None if None in values or len(values) < 2 else \
                    max(values) / max(min(values), 1e-6) <= t["stats_growth"]  # type: ignore
                out.append((f"stats: {what} the same order at every history size", ok, shown))
        right = all(stats[s].get("counts_right") for s in sizes)
        out.append(("stats: counts right", right, ", ".join(
            f"{int(s):,}: {stats[s].get('counts_right')}" for s in sizes)))
    return out


# -- tables --------------------------------------------------------------------------------------

JOB_METRICS = ("p50_lateness_ms", "p99_lateness_ms", "max_lateness_ms", "jobs_per_s", "ran",
               "missed", "max_loop_lag_ms", "p99_loop_lag_ms", "add_max_loop_lag_ms",
               "healthz_p99_ms", "healthz_max_ms", "round_trips_per_job",
               "wire_commands_per_job", "app_round_trips", "scheduler_round_trips",
               "gc_pauses", "gc_median_ms", "gc_max_ms", "gc_over_20ms", "add_s",
               "peak_rss_mb")
ADD_METRICS = ("adds_per_s", "added", "add_s", "peak_rss_mb", "rss_before_mb", "rss_after_mb",
               "max_loop_lag_ms", "p99_loop_lag_ms", "healthz_p99_ms", "round_trips_per_job",
               "gc_pauses", "gc_max_ms")
STATS_METRICS = ("stats_median_ms", "stats_p99_ms", "metrics_median_ms", "metrics_p99_ms",
                 "naive_count_median_ms", "insert_s", "peak_rss_mb")


def grid(title: str, columns: dict[str, dict[str, Any]], metrics: tuple[str, ...],
         versus: list[str]) -> list[str]:
    names = list(columns)
    head = f"{'metric':24s}" + "".join(f"{n[:17]:>18s}" for n in names) + \
        "".join(f"{('e/' + v.removeprefix('aps_'))[:17]:>18s}" for v in versus)
    lines = [title, head, "-" * len(head)]
    for metric in metrics:
        values = [columns[n].get(metric) for n in names]
        if all(v is None for v in values):
            continue
        star = "*" if metric in STORE_BOUND else ""
        row = f"{metric + star:24s}" + "".join(f"{fmt(v):>18s}" for v in values)
        row += "".join(f"{ratio(columns[names[0]].get(metric), columns[v].get(metric)):>18s}"
                       for v in versus)
        lines.append(row)
    for name in names:
        column = columns[name]
        notes = []
        if "error" in column:
            notes.append(f"NOT MEASURED: {column['error']}")
        if column.get("timed_out"):
            notes.append(f"TIMED OUT in {column.get('timed_out_in')} (partial figures)")
        if column.get("complete") is False:
            notes.append(f"adding stopped at the budget: {fmt(column.get('added'))} of "
                         f"{fmt(column.get('n'))} added")
        if column.get("slack_s") is not None and column["slack_s"] < 0.5:
            notes.append(f"adding overran the due time by {-column['slack_s']:.1f} s")
        if notes:
            lines.append(f"  {name}: " + "; ".join(notes))
    return lines


def table(report: dict[str, Any]) -> str:
    lines = [f"store: {report['store']}; load average at start {report['load_start']}, "
             f"at end {report['load_end']}; {os.cpu_count()} CPUs",
             "(* store-bound: set by the store's time per query; ratios are engine / "
             "baseline, lower is better except jobs_per_s, ran and adds_per_s)", ""]
    for suite in ("burst", "spread"):
        res = report.get(suite)
        if not res:
            continue
        cols = {"engine": res["engine"], **{b: res[b] for b in BASELINES if b in res}}
        versus = [b for b in BASELINES if b in res and "error" not in res[b]]
        n = res["engine"].get("n")
        title = (f"== burst: {fmt(n)} jobs due at one instant" if suite == "burst" else
                 f"== spread: {fmt(n)} jobs due evenly over {report['spread_seconds']:g} s")
        lines += grid(title, cols, JOB_METRICS, versus)
        if res.get("engine_runs"):
            lines.append("  engine, every run: " + "; ".join(
                f"lag {fmt(r.get('max_loop_lag_ms'))} ms, p99 late "
                f"{fmt(r.get('p99_lateness_ms'))} ms, healthz p99 {fmt(r.get('healthz_p99_ms'))}"
                f" ms, {fmt(r.get('round_trips_per_job'))} trips/job"
                for r in res["engine_runs"]))
        lines.append("")
    adds = report.get("adds")
    if adds:
        versus = [k for k in adds if k != "engine" and "error" not in adds[k]]
        lines += grid(f"== adds: {report['adds_n']:,} delayed runs due over the next day, "
                      "clock running", adds, ADD_METRICS, versus)
        lines.append("")
    stats = report.get("stats")
    if stats:
        cols = {f"history {int(k):,}": v for k, v in sorted(stats.items(), key=lambda kv:
                                                              int(kv[0]))}
        lines += grid("== stats: Operations.stats() and GET /metrics, 20 each", cols,
                      STATS_METRICS, [])
        sizes = sorted(stats, key=int)
        if len(sizes) >= 2:
            small, large = stats[sizes[0]], stats[sizes[-1]]
            growth = {m: ratio(large.get(m), small.get(m)) for m in
                      ("stats_median_ms", "metrics_median_ms", "naive_count_median_ms")}
            lines.append(f"  growth {int(sizes[0]):,} -> {int(sizes[-1]):,}: stats "
                         f"{growth['stats_median_ms']}, /metrics {growth['metrics_median_ms']}, "
                         f"naive count {growth['naive_count_median_ms']}")
        lines.append("")
    for what, ok, numbers in report["targets"]:
        lines.append(f"{verdict(ok)}  {what}: {numbers}")
    return "\n".join(lines)


# -- entry points ------------------------------------------------------------------------------


async def child_main(args: argparse.Namespace) -> None:
    suite, kind = args.child.split(":")
    if suite in ("burst", "spread"):
        result = await (engine_jobs(args, suite) if kind == "engine" else
                        aps_jobs(args, suite, kind))
    elif suite == "adds":
        result = await adds_scenario(args, kind)
    else:
        result = await stats_scenario(args, args.history[0])
    if SAMPLER:
        print(SAMPLER.report(), file=sys.stderr, flush=True)
    emit(result)
    os._exit(0)  # no graceful shutdown: it only costs time here


def main() -> None:
    global SAMPLER
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", default="burst",
                        help=f"comma-separated, of {', '.join(SUITES)}, or all (default: burst)")
    parser.add_argument("--uri", help="run on this MongoDB-wire server (default: embedded)")
    parser.add_argument("--jobs", type=int, default=10_000, help="burst size (10,000)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the engine's burst this many times (the loop-lag target "
                             "asks for 3 consecutive runs)")
    parser.add_argument("--spread-jobs", type=int, default=300)
    parser.add_argument("--spread-seconds", type=float, default=30.0)
    parser.add_argument("--adds", type=int, default=100_000, help="adds suite size (100,000)")
    parser.add_argument("--history", default="1000,1000000",
                        help="finished runs in history for the stats suite, comma-separated")
    parser.add_argument("--stats-repeat", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=200, help="the engine queue's")
    parser.add_argument("--baselines", default=",".join(BASELINES),
                        help="comma-separated, of " + ", ".join(BASELINES) + " (or none)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds after the last due time to give up (default 60 + N/25)")
    parser.add_argument("--lead", type=float, default=None,
                        help="seconds from the first add to the first due time "
                             "(default: estimated, raised if adding overran it)")
    parser.add_argument("--add-budget", type=float, default=90.0,
                        help="burst/spread: stop a baseline whose adding takes longer (90 s)")
    parser.add_argument("--adds-budget", type=float, default=60.0,
                        help="adds suite: stop a baseline's adding after this many seconds (60)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--save", help="also write the JSON report to this file")
    parser.add_argument("--render", help="print the table of a report saved with --save")
    parser.add_argument("--profile", action="store_true", help="with --child: sample stacks")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.history = [int(x) for x in str(args.history).split(",") if x]
    args.baselines = [b for b in args.baselines.split(",") if b and b != "none"]
    if unknown := set(args.baselines) - set(BASELINES):
        parser.error(f"unknown baselines: {', '.join(sorted(unknown))}")
    if args.timeout is None:
        args.timeout = 60 + args.jobs / 25
    if args.render:
        report = json.loads(Path(args.render).read_text())
        report["targets"] = [(t["target"], t["pass"], t["measured"]) for t in report["targets"]]
        print(table(report))
        return
    if args.child:
        benchlib.quiet_logging()
        if args.profile:
            SAMPLER = Sampler()
        if args.lead is None:
            suite, kind = args.child.split(":")
            args.lead = default_lead(args, suite, kind)
        asyncio.run(child_main(args))
        return
    suites = list(SUITES) if args.suite == "all" else [s for s in args.suite.split(",") if s]
    if unknown := set(suites) - set(SUITES):
        parser.error(f"unknown suites: {', '.join(sorted(unknown))}")
    started = time.time()
    report: dict[str, Any] = {
        "store": "embedded (mongomock)" if not args.uri else
        f"wire server {benchlib.mask(args.uri)}",
        "uri": benchlib.mask(args.uri) if args.uri else None,
        "load_start": benchlib.loadavg(), "command": " ".join(["python", *sys.argv]),
        "spread_seconds": args.spread_seconds, "adds_n": args.adds,
    }
    for suite in suites:
        if suite in ("burst", "spread"):
            report[suite] = run_jobs_suite(args, suite)
        elif suite == "adds":
            report["adds"] = run_adds_suite(args)
        else:
            report["stats"] = run_stats_suite(args)
    report["load_end"] = benchlib.loadavg()
    report["seconds"] = round(time.time() - started)
    report["targets"] = targets(report)
    text = table(report)
    report["targets"] = [{"target": w, "pass": ok, "measured": m}
                         for w, ok, m in report["targets"]]
    if args.save:
        Path(args.save).write_text(json.dumps(report, default=str, indent=1))
    print(json.dumps(report, default=str) if args.json else text)


if __name__ == "__main__":
    main()
