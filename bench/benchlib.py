"""What the benchmarks share: the store (embedded or a server), counting round trips,
loop lag, garbage-collection pauses, the /healthz prober, child processes, tables.

Not a benchmark itself: `python bench/benchlib.py --probe URL` is the prober's child.

Stores. Without `--uri` a benchmark runs on the embedded store (mongomock, as with
``MONGODB_URI=memory://``); with ``--uri mongodb://host:port`` on that server, in a
database of its own (``bench_<name>_<pid>_<random>``), dropped at the end.

Round trips, three counts:
- ``Mongo.round_trips``: the application's queries (one per `Mongo.call`);
- ``engine.scheduler.round_trips``: APScheduler's job-store queries;
- on a server, ``wire``: every command the drivers sent (pymongo's command
  monitoring on both clients: getMore, pings and the job store included), as a check
  of the first two. For a bare APScheduler baseline the wire count (server) or a
  count of calls into its collection (mongomock) is the only one.
"""

from __future__ import annotations

import asyncio
import gc
import http.client
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LAG_INTERVAL = 0.01
PROBE_INTERVAL = 0.02
# Collection names as the daemon uses them (literals: the bench must not follow renames
# of the modules that hold them).
RUNS = "mwapjobs_runs"
QUEUES = "mwapjobs_queues"
INTEGRATIONS = "cloudProviderIntegrations"
PROVIDERS = "cloudProviders"
INTEGRATION_STATE = "mwapjobs_integrations"


# -- numbers ------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def peak_rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def rss_mb() -> float:
    import psutil

    return round(psutil.Process().memory_info().rss / 2**20, 1)


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:,.2f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def ratio(a: Any, b: Any) -> str:
    """a / b, for a table ("-" when either is missing)."""
    if not isinstance(a, int | float) or not isinstance(b, int | float) or \
            isinstance(a, bool) or isinstance(b, bool):
        return "-"
    if b == 0:
        return "-" if a == 0 else "inf"
    r = a / b
    if r >= 100:
        return f"{r:,.0f}x"
    return f"{r:.3g}x" if r >= 0.001 or r == 0 else "<0.001x"


def verdict(ok: bool | None) -> str:
    return "n/a " if ok is None else ("PASS" if ok else "FAIL")


# -- the event loop ---------------------------------------------------------------------


class LagMonitor:
    """Sleeps `interval` in a loop and records how late it wakes up, with when. `stall()`
    also sees a block still in progress (for a watchdog on another thread)."""

    def __init__(self, interval: float = LAG_INTERVAL) -> None:
        self.interval = interval
        self.samples: list[tuple[float, float]] = []  # (time.time() at wake-up, lag)
        self.last_tick = time.perf_counter()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.samples = []
        self.last_tick = time.perf_counter()
        self._task = asyncio.ensure_future(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            now = time.perf_counter()
            self.samples.append((time.time(), max(0.0, now - self.last_tick - self.interval)))
            self.last_tick = now

    def stall(self) -> float:
        return max(0.0, time.perf_counter() - self.last_tick - self.interval)

    def summary(self, since: float = 0.0, until: float = float("inf"),
                prefix: str = "") -> dict[str, Any]:
        lags = [lag for at, lag in self.samples if since <= at <= until]
        if until == float("inf") and self._task is not None:
            lags.append(self.stall())
        worst = max(lags, default=None)
        return {f"{prefix}max_loop_lag_ms": ms(worst),
                f"{prefix}p99_loop_lag_ms": ms(percentile(lags, 0.99))}


class GcPauses:
    """Garbage-collection pauses, from `gc.callbacks` (a collection stops every thread)."""

    def __init__(self) -> None:
        self.pauses: list[tuple[float, int, float]] = []  # (time.time(), generation, s)
        self._started: float | None = None

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.pauses.append((time.time(), int(info.get("generation", -1)),
                                time.perf_counter() - self._started))
            self._started = None

    def start(self) -> None:
        gc.callbacks.append(self._callback)

    def stop(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def summary(self, since: float = 0.0, until: float = float("inf"),
                over: float = 0.020) -> dict[str, Any]:
        chosen = [(g, s) for at, g, s in self.pauses if since <= at <= until]
        durations = [s for _, s in chosen]
        return {
            "gc_pauses": len(durations),
            "gc_median_ms": ms(percentile(durations, 0.5)),
            "gc_max_ms": ms(max(durations, default=None)),
            "gc_over_20ms": sum(1 for s in durations if s > over),
            "gc_by_generation": dict(sorted(Counter(str(g) for g, _ in chosen).items())),
        }


# -- stores --------------------------------------------------------------------------------


class CommandCounter:
    """A pymongo CommandListener counting the commands a client sends (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.by_name: Counter[str] = Counter()

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.by_name.values())

    def listener(self) -> Any:
        from pymongo import monitoring

        counter = self

        class Listener(monitoring.CommandListener):
            def started(self, event: Any) -> None:
                with counter._lock:
                    counter.by_name[event.command_name] += 1

            def succeeded(self, event: Any) -> None:
                pass

            def failed(self, event: Any) -> None:
                pass

        return Listener()


class Store:
    """The database a benchmark runs on: `mongo` for the daemon, `wire` counting every
    command on a server (None on the embedded store)."""

    def __init__(self, uri: str | None, name: str) -> None:
        self.uri = uri
        self.db_name = f"bench_{name}_{os.getpid()}_{secrets.token_hex(3)}" if uri else "mwap"
        self.wire: CommandCounter | None = CommandCounter() if uri else None
        self.mongo = self._connect()

    @property
    def label(self) -> str:
        return "embedded (mongomock)" if not self.uri else f"wire server {mask(self.uri)}"

    @property
    def embedded(self) -> bool:
        return self.uri is None

    def _client_options(self) -> dict[str, Any]:
        return {"serverSelectionTimeoutMS": 10_000, "connectTimeoutMS": 10_000,
                "socketTimeoutMS": 600_000, "tz_aware": True, "appname": "mwapjobs-bench"}

    def _connect(self) -> Any:
        from mwapjobs.storage.mongo import Mongo

        if self.uri is None:
            import mongomock

            return Mongo.from_clients(mongomock.MongoClient(tz_aware=True))
        import pymongo
        from motor.motor_asyncio import AsyncIOMotorClient

        assert self.wire is not None
        options = self._client_options()
        sync = pymongo.MongoClient(self.uri, event_listeners=[self.wire.listener()], **options)
        motor = AsyncIOMotorClient(self.uri, event_listeners=[self.wire.listener()], **options)
        return Mongo.from_clients(sync, self.db_name, async_client=motor)

    def settings_uri(self) -> str:
        return "memory://" if self.uri is None else f"{self.uri.rstrip('/')}/{self.db_name}"

    def sync_client(self) -> Any:
        """A plain client for this store (the bench's own reads and the baselines)."""
        if self.uri is None:
            return self.mongo.jobstore_client()
        import pymongo

        return pymongo.MongoClient(self.uri, **self._client_options())

    def drop(self) -> None:
        if self.uri is None:
            return
        import pymongo

        client = pymongo.MongoClient(self.uri, serverSelectionTimeoutMS=10_000)
        try:
            client.drop_database(self.db_name)
        finally:
            client.close()


def mask(uri: str) -> str:
    """A URI without its credentials."""
    scheme, sep, rest = uri.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}" if sep else uri


class CountingCollection:
    """Wraps a (mongomock) collection and counts every call of a query method: how a
    bare APScheduler `MongoDBJobStore` is counted on the embedded store."""

    QUERIES = frozenset({"find", "find_one", "insert_one", "insert_many", "update_one",
                         "update_many", "replace_one", "delete_one", "delete_many",
                         "count_documents", "find_one_and_update", "create_index",
                         "aggregate", "distinct", "bulk_write"})

    def __init__(self, collection: Any) -> None:
        self._collection = collection
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._collection, name)
        if name in self.QUERIES and callable(attr):
            def counted(*args: Any, **kwargs: Any) -> Any:
                self.calls += 1
                return attr(*args, **kwargs)
            return counted
        return attr


def aps_mongo_store(store: Store, collection: str = "aps_jobs") -> tuple[Any, Callable[[], int]]:
    """APScheduler's own `MongoDBJobStore` on the benchmark's store, and a function that
    says how many queries it has sent so far."""
    from apscheduler.jobstores.mongodb import MongoDBJobStore

    if store.uri is None:
        import mongomock

        jobstore = MongoDBJobStore(database="aps", collection=collection,
                                   client=mongomock.MongoClient(tz_aware=True))
        counting = CountingCollection(jobstore.collection)
        jobstore.collection = counting
        return jobstore, lambda: counting.calls
    import pymongo

    counter = CommandCounter()
    client = pymongo.MongoClient(store.uri, event_listeners=[counter.listener()],
                                 **store._client_options())
    jobstore = MongoDBJobStore(database=store.db_name, collection=collection, client=client)
    return jobstore, lambda: counter.total


# -- the /healthz prober -----------------------------------------------------------------


class Prober:
    """A child process polling a URL every PROBE_INTERVAL, a new connection each time.
    "reset" drops the samples so far; `stop()` returns them."""

    def __init__(self, url: str) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, __file__, "--probe", url],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )

    async def ready(self) -> None:
        assert self._proc.stdout is not None
        await asyncio.to_thread(self._proc.stdout.readline)

    def reset(self) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.write("reset\n")
        self._proc.stdin.flush()

    def stop(self) -> dict[str, Any]:
        out, _ = self._proc.communicate(timeout=60)
        data = dict(json.loads(out))
        latencies = data["latencies_ms"]
        return {"healthz_p99_ms": round(percentile(latencies, 0.99) or 0, 2) if latencies
                else None,
                "healthz_max_ms": round(max(latencies), 2) if latencies else None,
                "healthz_samples": len(latencies), "healthz_errors": data["errors"]}


def probe_main(url: str) -> None:
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
        try:
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


async def healthz_server() -> int:
    """An aiohttp /healthz like the daemon's, on this loop (for the bare baselines)."""
    from aiohttp import web

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"success": True, "data": {"status": "alive"}})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]


# -- child processes -------------------------------------------------------------------------


def run_child(cmd: list[str], name: str, timeout: float) -> dict[str, Any]:
    """Run one scenario in its own process; its last stdout line is its JSON result."""
    say(f"running {name}...")
    started = time.time()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        stdout, stderr, error = done.stdout, done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) \
            else (exc.stdout or "")
        stderr, error = exc.stderr or b"", "killed"
    if isinstance(stderr, bytes):
        stderr = stderr.decode(errors="replace")
    lines = [line for line in stdout.strip().splitlines() if line.startswith("{")]
    if stderr.strip():
        log = Path(tempfile.gettempdir()) / f"mwapjobs-bench-{name}.stderr"
        log.write_text(stderr)
    if error or not lines:
        last = (stderr.strip().splitlines() or ["no output"])[-1]
        say(f"{name}: {'killed' if error == 'killed' else 'failed'} after "
            f"{time.time() - started:.0f} s")
        return {"error": f"{'killed' if error == 'killed' else 'failed'}: {last[:200]} "
                         f"(stderr in {tempfile.gettempdir()}/mwapjobs-bench-{name}.stderr)"}
    say(f"{name}: done in {time.time() - started:.0f} s")
    return dict(json.loads(lines[-1]))


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def emit(result: dict[str, Any]) -> None:
    print(json.dumps(result, default=str), flush=True)


def quiet_logging() -> None:
    import logging

    logging.basicConfig(level=logging.ERROR)
    os.environ.pop("MWAPJOBS_CONFIG", None)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--probe":
        probe_main(sys.argv[2])
