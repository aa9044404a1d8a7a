"""Burst benchmark: N trivial jobs fall due in the same instant.

What is measured (one scenario per fresh subprocess, so that peak RSS, threads
and the GIL of one cannot pollute another):

- ``engine``: the full mwapjobs daemon (`Daemon`) on the embedded store
  (mongomock, as with ``MONGODB_URI=memory://``), one queue with a trivial
  async handler and concurrency 200. Jobs are added with ``engine.add(run_at=T)``
  while APScheduler is paused (as the baselines are; ``--no-pause`` to keep it
  running: then every add wakes it and adding becomes quadratic on mongomock).
- ``apscheduler_mongodb``: bare ``AsyncIOScheduler`` + ``MongoDBJobStore`` on
  mongomock, default job settings (``misfire_grace_time=1``).
- ``apscheduler_memory``: bare ``AsyncIOScheduler`` + ``MemoryJobStore``, same.

Every scenario adds N jobs due at a common instant T (chosen so that adding is
over before T; see ``--lead``), then measures from just before T until every job
has run or was missed (or ``--timeout`` seconds after T):

- loop lag (max, p99): a task sleeping 10 ms and recording how late it wakes;
  a stall still in progress at a timeout counts too;
- lateness (p50, p99): handler start minus T, over the jobs that ran;
- jobs_per_s: jobs finished / (last finish - T); for the engine "finished"
  means the completed state is written to MongoDB;
- ran / missed: the engine misses what did not complete; APScheduler misses
  what it reports as EVENT_JOB_MISSED;
- healthz_p99_ms: a separate process GETs ``/healthz`` (the daemon's, or an
  equivalent aiohttp route on the baseline's loop) every 20 ms, new
  connection each time, throughout the burst;
- peak_rss_mb: the scenario process's ``ru_maxrss`` (adding included);
- engine only, db_round_trips_per_job: queries counted by ``Mongo.round_trips``
  plus the APScheduler job store's ``round_trips`` during the burst window,
  per completed job (background loops included; they run on timers);
  readyz_failing_s: how long `/readyz` would have answered 503 during the burst.

Run (from the repository root, with the project's venv):

    python bench/engine.py                  # 10,000 jobs, table with ratios and PASS/FAIL
    python bench/engine.py --jobs 2000 --json
    python bench/engine.py --scenario engine --jobs 2000 --profile  # where time goes

``--profile`` (with ``--scenario``) samples every thread's stack during the
burst, records the main thread's stack while the loop is stalled, and times
each query on the embedded store's thread by call site; all to stderr.

mongomock scans whole collections on every query, so the mongomock-backed
scenarios grow quadratically with N; they are bounded by ``--timeout`` and
report whatever had happened by then (``timed_out: true``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import faulthandler
import http.client
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SCENARIOS = ("engine", "apscheduler_mongodb", "apscheduler_memory")
BASELINES = SCENARIOS[1:]
ENGINE_CONCURRENCY = 200
LAG_INTERVAL = 0.01
PROBE_INTERVAL = 0.02
TARGETS = {  # metric: (comparison, limit)
    "max_loop_lag_ms": ("<=", 50.0),
    "missed": ("==", 0),
    "db_round_trips_per_job": ("<=", 4.0),
    "healthz_p99_ms": ("<=", 50.0),
}
METRICS = ("max_loop_lag_ms", "p99_loop_lag_ms", "p50_lateness_ms", "p99_lateness_ms",
           "jobs_per_s", "ran", "missed", "peak_rss_mb", "healthz_p99_ms",
           "db_round_trips_per_job")


# -- measuring ---------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


class LagMonitor:
    """Sleeps `interval` in a loop and records how late it wakes up. `stall()` also
    sees a block still in progress, for the watchdog to read from another thread."""

    def __init__(self, interval: float = LAG_INTERVAL) -> None:
        self.interval = interval
        self.samples: list[float] = []
        self.last_tick = time.perf_counter()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.samples.clear()
        self.last_tick = time.perf_counter()
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            now = time.perf_counter()
            self.samples.append(max(0.0, now - self.last_tick - self.interval))
            self.last_tick = now

    def stall(self) -> float:
        return max(0.0, time.perf_counter() - self.last_tick - self.interval)


class Prober:
    """A child process (this script with --probe) that polls a URL. Its stdin takes
    "reset" (drop samples so far); closing it makes it print its samples and exit."""

    def __init__(self, url: str) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, __file__, "--probe", url],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )

    async def ready(self) -> None:
        """Wait for the first answer (interpreter start-up takes a while)."""
        assert self._proc.stdout is not None
        await asyncio.to_thread(self._proc.stdout.readline)

    def reset(self) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.write("reset\n")
        self._proc.stdin.flush()

    def stop(self) -> dict[str, Any]:
        out, _ = self._proc.communicate(timeout=30)
        return dict(json.loads(out))


def probe_main(url: str) -> None:
    """Poll `url` every PROBE_INTERVAL, fresh connection each time, until stdin closes;
    then print latencies (ms). A request still in flight counts with its age so far."""
    host, _, path = url.removeprefix("http://").partition("/")
    hostname, _, port = host.partition(":")
    lock = threading.Lock()
    samples: list[float] = []
    errors = 0
    in_flight: float | None = None
    first = True

    def control() -> None:
        nonlocal errors
        for _line in sys.stdin:  # "reset"
            with lock:
                samples.clear()
                errors = 0
        try:  # the reader may be gone (its process was killed): exit anyway
            with lock:
                pending = [] if in_flight is None else [(time.perf_counter() - in_flight) * 1000]
                print(json.dumps({"latencies_ms": samples + pending, "errors": errors}),
                      flush=True)
        finally:
            os._exit(0)

    threading.Thread(target=control, daemon=True).start()
    while True:
        with lock:
            in_flight = time.perf_counter()
        try:
            conn = http.client.HTTPConnection(hostname, int(port), timeout=600)
            conn.request("GET", "/" + path)
            response = conn.getresponse()
            response.read()
            conn.close()
            ok = response.status == 200
        except OSError:
            ok = False
        if first:
            print("ready", flush=True)
            first = False
        with lock:
            samples.append((time.perf_counter() - in_flight) * 1000)
            errors += not ok
            in_flight = None
        time.sleep(PROBE_INTERVAL)


class Burst:
    """What happens from just before T until the burst is over."""

    def __init__(self, n: int, due: datetime, timeout: float) -> None:
        self.n = n
        self.t0 = due.timestamp()
        self.phase = "setting up"
        self.starts: list[float] = []
        self.finishes: list[float] = []
        self.missed: int | None = None  # None: whatever did not finish was missed
        self.lag = LagMonitor()
        self.prober: Prober | None = None
        self.extra: dict[str, Any] = {}
        self.round_trips: Callable[[], tuple[int, int]] | None = None
        self._trips_at_start = (0, 0)
        # If the loop is stuck past the deadline, report from another thread and exit.
        self.deadline = self.t0 + timeout
        self._watchdog = threading.Timer(self.deadline + 10 - time.time(), self._bark)
        self._watchdog.daemon = True
        self._watchdog.start()

    def started(self) -> None:
        self.starts.append(time.time())

    def finished(self) -> None:
        self.finishes.append(time.time())

    async def open(self, healthz_url: str) -> None:
        """Start measuring shortly before T."""
        self.phase = "waiting for T"
        await asyncio.sleep(max(0.0, self.t0 - 1.0 - time.time()))
        self.prober = Prober(healthz_url)
        await self.prober.ready()
        await asyncio.sleep(max(0.0, self.t0 - 0.3 - time.time()))
        self.prober.reset()
        self.lag.start()
        if SAMPLER:
            SAMPLER.start(self.lag)
            QUERIES.clear()
        if self.round_trips:
            self._trips_at_start = self.round_trips()

    async def wait(self, done: Callable[[], bool]) -> bool:
        """Wait until `done()`; False at the deadline."""
        self.phase = "burst"
        try:
            while not done():
                if time.time() > self.deadline:
                    return False
                await asyncio.sleep(0.05)
            return True
        finally:
            self._watchdog.cancel()

    def _bark(self) -> None:
        emit(self.summary(timed_out=True))
        os._exit(0)

    def summary(self, timed_out: bool) -> dict[str, Any]:
        lags = [*self.lag.samples, self.lag.stall()]
        lateness = [s - self.t0 for s in self.starts]
        span = max(self.finishes) - self.t0 if self.finishes else None
        probe = self.prober.stop() if self.prober else {"latencies_ms": [], "errors": 0}
        ran = len(self.finishes)
        result: dict[str, Any] = {
            "max_loop_lag_ms": ms(max(lags)),
            "p99_loop_lag_ms": ms(percentile(lags, 0.99)),
            "p50_lateness_ms": ms(percentile(lateness, 0.50)),
            "p99_lateness_ms": ms(percentile(lateness, 0.99)),
            "jobs_per_s": round(ran / span, 1) if span else 0.0,
            "ran": ran,
            "missed": self.n - ran if self.missed is None else self.missed,
            "unfinished": self.n - ran - (self.missed or 0),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "healthz_p99_ms": ms(percentile([x / 1000 for x in probe["latencies_ms"]], 0.99)),
            "healthz_samples": len(probe["latencies_ms"]),
            "healthz_errors": probe["errors"],
            "timed_out": timed_out,
        }
        if timed_out:
            result["timed_out_in"] = self.phase
        if self.round_trips:
            trips = [now - then for now, then in zip(self.round_trips(), self._trips_at_start,
                                                     strict=True)]
            result["db_round_trips_per_job"] = round(sum(trips) / max(ran, 1), 3)
            result["db_round_trips_runs"], result["db_round_trips_scheduler"] = trips
        return {**result, **self.extra}


def emit(result: dict[str, Any]) -> None:
    print(json.dumps(result), flush=True)


# -- the engine ------------------------------------------------------------------------


def engine_lead(n: int, pause: bool = True) -> float:
    """Seconds from the first add to T. Without the pause, adding on mongomock is
    quadratic (about 10 s for 2,000 jobs)."""
    return 2.0 + n * 1e-3 if pause else 2.0 + n * 1e-3 + (n / 1000) ** 2 * 3


async def add_in_batches(add: Callable[[], Any], n: int, batch: int = 200) -> None:
    for start in range(0, n, batch):
        await asyncio.gather(*(add() for _ in range(min(batch, n - start))))


async def watch_readiness(daemon: Any, burst: Burst, every: float = 0.5) -> None:
    """Seconds during the burst in which /readyz would have said 503, and why: the
    daemon's MongoDB ping queues behind the burst's queries."""
    burst.extra["readyz_failing_s"] = 0.0
    while True:
        await asyncio.sleep(every)
        reasons = daemon.not_ready_reasons()
        if reasons:
            burst.extra["readyz_failing_s"] += every
            burst.extra["readyz_reason"] = reasons[0][:120]


async def engine_scenario(n: int, lead: float | None, timeout: float,
                          pause: bool = True) -> dict[str, Any]:
    """The daemon on mongomock. With `pause`, APScheduler is paused while adding (as the
    baselines are): otherwise every trigger added wakes the scheduler thread, which
    rescans its store under the lock the next add needs, so adding is O(N) per job."""
    import mongomock

    from mwapjobs.config import Settings
    from mwapjobs.daemon import Daemon
    from mwapjobs.storage.mongo import Mongo

    # Defaults, but token refresh and health checks off: they need MWAP's encryption
    # key and data, and they are not what is measured here.
    settings = Settings(mongodb_uri="memory://", http={"host": "127.0.0.1", "port": 0},
                        refresh={"enabled": False}, health={"enabled": False})
    mongo = Mongo.from_clients(mongomock.MongoClient(tz_aware=True))
    daemon = Daemon(settings, mongo=mongo)
    burst: Burst | None = None

    async def handler(_job: Any) -> None:
        assert burst is not None
        burst.started()

    def on_event(event: str, _run: dict[str, Any]) -> None:
        if event == "completed" and burst is not None:
            burst.finished()

    daemon.registry.register("bench", handler, concurrency=ENGINE_CONCURRENCY, attempts=1)
    await daemon.start()
    await daemon.wait_ready()
    daemon.engine.subscribe(on_event)
    engine = daemon.engine
    aps = engine.scheduler._aps  # private: see the docstring
    began = time.time()
    due = datetime.fromtimestamp(began + (lead or engine_lead(n, pause)), UTC)
    burst = Burst(n, due, timeout)
    burst.phase = "adding"
    if pause:
        aps.pause()
    await add_in_batches(lambda: engine.add("bench", run_at=due), n)
    if pause:
        aps.resume()
    burst.extra["add_s"] = round(time.time() - began, 2)
    burst.extra["slack_s"] = round(burst.t0 - time.time(), 2)
    burst.round_trips = lambda: (mongo.round_trips, engine.scheduler.round_trips)
    await burst.open(f"http://127.0.0.1:{daemon.port}/healthz")
    readiness = asyncio.ensure_future(watch_readiness(daemon, burst))
    finished = await burst.wait(lambda: len(burst.finishes) >= n)
    readiness.cancel()
    return burst.summary(timed_out=not finished)


# -- the APScheduler baselines -------------------------------------------------------------

BURST: Burst | None = None  # for the job function, which the MongoDB store pickles by name


async def aps_job() -> None:
    assert BURST is not None
    BURST.started()
    BURST.finished()


async def healthz_server() -> int:
    """An aiohttp /healthz equivalent to the daemon's, on this loop; returns its port."""
    from aiohttp import web

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]


def make_store(kind: str) -> Any:
    if kind == "apscheduler_memory":
        from apscheduler.jobstores.memory import MemoryJobStore

        return MemoryJobStore()
    import mongomock
    from apscheduler.jobstores.mongodb import MongoDBJobStore

    return MongoDBJobStore(database="bench", collection="jobs",
                           client=mongomock.MongoClient(tz_aware=True))


async def aps_scenario(kind: str, n: int, lead: float | None, timeout: float) -> dict[str, Any]:
    global BURST
    from apscheduler.events import EVENT_JOB_MISSED
    from apscheduler.schedulers.asyncio import AsyncIOScheduler

    port = await healthz_server()
    scheduler = AsyncIOScheduler(jobstores={"default": make_store(kind)}, timezone=UTC)
    due = datetime.fromtimestamp(time.time() + (lead or 2.0 + n * 2e-4), UTC)
    burst = BURST = Burst(n, due, timeout)
    burst.missed = 0

    def on_missed(_event: Any) -> None:
        burst.missed = (burst.missed or 0) + 1

    scheduler.add_listener(on_missed, EVENT_JOB_MISSED)
    scheduler.start(paused=True)  # paused: adding does not wake the scheduler each time
    began = time.time()
    burst.phase = "adding"
    for i in range(n):
        scheduler.add_job(aps_job, "date", run_date=due, id=f"job-{i}")
    burst.extra["add_s"] = round(time.time() - began, 2)
    burst.extra["slack_s"] = round(burst.t0 - time.time(), 2)
    scheduler.resume()
    await burst.open(f"http://127.0.0.1:{port}/healthz")
    finished = await burst.wait(lambda: len(burst.finishes) + (burst.missed or 0) >= n)
    return burst.summary(timed_out=not finished)


# -- profiling (--profile) ---------------------------------------------------------------

SAMPLER: Sampler | None = None
QUERIES: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])  # count, seconds


def time_queries() -> None:
    """Time every query of the engine on the embedded store's thread, by call site."""
    from mwapjobs.storage import mongo as mongo_module

    original = mongo_module._invoke

    async def timed(op: Any, db: Any) -> Any:
        started = time.perf_counter()
        try:
            return await original(op, db)
        finally:
            entry = QUERIES[op.__qualname__.removesuffix(".<locals>.<lambda>")]
            entry[0] += 1
            entry[1] += time.perf_counter() - started

    mongo_module._invoke = timed


def query_report() -> str:
    lines = ["-- queries on the embedded store's thread during the burst --",
             f"{'count':>7s} {'total s':>8s} {'mean ms':>8s}  call site"]
    for site, (count, total) in sorted(QUERIES.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"{count:7d} {total:8.2f} {total / count * 1000:8.2f}  {site}")
    return "\n".join(lines)


STALL = 0.1
PROJECTS = ("mwapjobs", "apscheduler", "mongomock", "asyncio", "aiohttp")
IDLE = {"select", "wait", "_worker", "accept", "readinto"}  # leaf frames of a waiting thread


class Sampler:
    """Samples every thread's stack during the burst; reports, per thread, the busiest
    leaf frames and project frames (mwapjobs, apscheduler, mongomock, asyncio).
    Samples whose leaf is a wait (select, lock, queue) are not counted. While the
    event loop is stalled (over STALL s late), the main thread's stack is kept too."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.leaf: collections.Counter[tuple[str, str]] = collections.Counter()
        self.owned: collections.Counter[tuple[str, str]] = collections.Counter()
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
                if ident != me:
                    self._record(names.get(ident, "?"), frame)
                if ident == main and self.lag and self.lag.stall() > STALL:
                    stack = traceback.extract_stack(frame)[-5:]
                    self.stalls[" < ".join(f"{e.name} {Path(e.filename).name}:{e.lineno}"
                                           for e in reversed(stack))] += 1

    def _record(self, thread: str, frame: Any) -> None:
        stack = traceback.extract_stack(frame)
        leaf = stack[-1]
        if leaf.name in IDLE:
            return
        self.busy[thread] += 1
        self.leaf[(thread, f"{leaf.name} {Path(leaf.filename).name}:{leaf.lineno}")] += 1
        seen = set()
        for entry in stack:
            if any(p in entry.filename for p in PROJECTS):
                key = (thread, f"{entry.name} {Path(entry.filename).name}:{entry.lineno}")
                if key not in seen:
                    seen.add(key)
                    self.owned[key] += 1

    def report(self, top: int = 25) -> str:
        self._stop.set()
        lines = [f"-- {self.ticks} ticks of {self.interval * 1000:g} ms; busy ticks per thread --"]
        lines += [f"{c:6d}  {t}" for t, c in self.busy.most_common()]
        lines += [f"-- main thread while the loop was stalled > {STALL * 1000:g} ms --"]
        lines += [f"{c:6d}  {stack}" for stack, c in self.stalls.most_common(10)]
        lines += ["-- inclusive samples, project frames --"]
        lines += [f"{c:6d}  {t:28.28s} {f}" for (t, f), c in self.owned.most_common(top)]
        lines += ["-- self samples (leaf frames) --"]
        lines += [f"{c:6d}  {t:28.28s} {f}" for (t, f), c in self.leaf.most_common(top)]
        return "\n".join(lines)


# -- the parent: run every scenario in its own process, compare ----------------------------


def hard_limit(args: argparse.Namespace) -> float:
    """Seconds after which a scenario process is killed (it dumps its stacks first)."""
    return args.timeout + (args.lead or engine_lead(args.jobs, not args.no_pause)) + 120


def run_child(name: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--scenario", name, "--jobs", str(args.jobs),
           "--timeout", str(args.timeout)]
    if args.lead is not None:
        cmd += ["--lead", str(args.lead)]
    if args.no_pause:
        cmd.append("--no-pause")
    print(f"running {name} ({args.jobs} jobs)...", file=sys.stderr, flush=True)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=hard_limit(args))
        stdout, stderr, error = done.stdout, done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        stdout, stderr, error = "", exc.stderr or b"", "killed"
    if isinstance(stderr, bytes):  # so it is after a timeout, whatever `text` says
        stderr = stderr.decode(errors="replace")
    lines = stdout.strip().splitlines()
    if error or not lines:
        log = Path(tempfile.gettempdir()) / f"mwapjobs-bench-{name}.stderr"
        log.write_text(stderr)
        last = (stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"{'killed' if error == 'killed' else 'failed'}: {last[:200]} "
                         f"(stderr in {log})"}
    return dict(json.loads(lines[-1]))


def check_targets(engine: dict[str, Any], n: int) -> dict[str, bool]:
    verdict = {}
    for metric, (op, limit) in TARGETS.items():
        value = engine.get(metric)
        verdict[metric] = value is not None and (value == limit if op == "==" else
                                                 value <= limit)
    verdict["ran"] = engine.get("ran") == n
    return verdict


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def ratio(a: Any, b: Any) -> str:
    if not isinstance(a, int | float) or not isinstance(b, int | float) or isinstance(a, bool):
        return "-"
    if b == 0:
        return "-" if a == 0 else "inf"
    r = a / b
    if r >= 100:
        return f"{r:,.0f}x"
    return f"{r:.3g}x" if r >= 0.001 or r == 0 else "<0.001x"


def table(report: dict[str, Any]) -> str:
    engine = report["engine"]
    results = {"engine": engine, **report["baselines"]}
    head = f"{'metric':24s}{'engine':>12s}{'aps+mongo':>12s}{'aps+memory':>12s}" \
           f"{'eng/mongo':>11s}{'eng/memory':>11s}"
    lines = [f"{report['jobs']:,} jobs due in the same second "
             "(ratios: engine / baseline; lower is better except jobs_per_s and ran)",
             head, "-" * len(head)]
    for metric in METRICS:
        e, m, r = (results[name].get(metric) for name in SCENARIOS)
        lines.append(f"{metric:24s}{fmt(e):>12s}{fmt(m):>12s}{fmt(r):>12s}"
                     f"{ratio(e, m):>11s}{ratio(e, r):>11s}")
    lines.append("")
    for name, result in results.items():
        if "error" in result:
            lines.append(f"{name}: ERROR {result['error']}")
            continue
        notes = [f"added in {fmt(result.get('add_s'))} s, {fmt(result.get('slack_s'))} s before T",
                 f"{fmt(result.get('healthz_samples'))} healthz samples"]
        if result.get("readyz_failing_s"):
            notes.append(f"/readyz failing for {fmt(result['readyz_failing_s'])} s "
                         f"({result.get('readyz_reason')})")
        if result.get("timed_out"):
            notes.append("TIMED OUT (partial figures)")
        if (result.get("slack_s") or 0) < 0.5:
            notes.append("adding overlapped T: rerun with a larger --lead")
        lines.append(f"{name}: " + "; ".join(notes))
    lines.append("")
    for metric, ok in report["targets"].items():
        limit = f"== {report['jobs']}" if metric == "ran" else " ".join(
            str(x) for x in TARGETS[metric])
        lines.append(f"{'PASS' if ok else 'FAIL'}  engine {metric} {limit} "
                     f"(got {fmt(engine.get(metric))})")
    return "\n".join(lines)


def run_scenario(name: str, args: argparse.Namespace) -> None:
    global SAMPLER
    logging.basicConfig(level=logging.ERROR)
    faulthandler.dump_traceback_later(hard_limit(args) - 30, exit=True)  # if stuck
    SAMPLER = Sampler() if args.profile else None
    if args.profile:
        time_queries()
    asyncio.run(scenario_main(name, args))


async def scenario_main(name: str, args: argparse.Namespace) -> None:
    if name == "engine":
        result = await engine_scenario(args.jobs, args.lead, args.timeout,
                                       pause=not args.no_pause)
    else:
        result = await aps_scenario(name, args.jobs, args.lead, args.timeout)
    if SAMPLER:
        print(SAMPLER.report(), query_report(), sep="\n", file=sys.stderr, flush=True)
    emit(result)
    # No graceful shutdown: a busy scheduler thread may hold it up for minutes.
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000, help="jobs in the burst")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds after T to give up on a scenario (default 60 + N/25)")
    parser.add_argument("--lead", type=float, default=None,
                        help="seconds from the first add to T (default: estimated from N)")
    parser.add_argument("--scenario", choices=SCENARIOS, help="run one scenario, print JSON")
    parser.add_argument("--profile", action="store_true",
                        help="with --scenario: sample all threads, print hot frames to stderr")
    parser.add_argument("--no-pause", action="store_true",
                        help="engine: keep APScheduler running while adding (slow on mongomock)")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe_main(args.probe)
        return
    if args.timeout is None:
        args.timeout = 60 + args.jobs / 25
    if args.scenario:
        run_scenario(args.scenario, args)
        return
    results = {name: run_child(name, args) for name in SCENARIOS}
    report = {
        "jobs": args.jobs,
        "engine": results["engine"],
        "baselines": {name: results[name] for name in BASELINES},
        "targets": check_targets(results["engine"], args.jobs),
    }
    print(json.dumps(report, indent=2) if args.json else table(report))


if __name__ == "__main__":
    main()
