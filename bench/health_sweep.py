"""Health-sweep benchmark: N integrations checked in one on-demand sweep, at the
default limits, against the rate-bound ideal.

Setup:
- a provider simulator (tests/support/providers.py) in its own process, playing
  Dropbox, Google Drive, Microsoft Graph and a generic API, each answer after
  ``--latency`` (default 20 ms);
- the full daemon (`Daemon`) on the store (embedded by default, ``--uri`` for a
  server), with ``--integrations`` connected integrations spread evenly over
  ``--providers`` providers (one per kind, then more of each), every access token
  encrypted as the backend stores it; token refresh off (bench/refresh_fleet.py);
- the daemon's DEFAULT health limits unless told otherwise: ``health.concurrency``
  20, ``health.provider_concurrency`` 5, ``health.provider_rate`` 10 starts/s.

Then one sweep is started the way an operator does it,
``POST /api/v1/integrations/health/check`` (spreading off), and awaited.

Figures (``--json`` prints them as one object):
- integrations, checked: seeded, and checked by the sweep (the run's result; every
  one must also have a history entry in the store, verified);
- sweep_seconds: the sweep run's own duration (reads, probes, result writes);
- ideal_seconds: what the limits allow at best: each provider's integrations /
  provider_rate (starts are spaced 1/rate apart per provider, providers in
  parallel), plus one latency; or N x latency / concurrency if that is longer.
  sweep / ideal is the daemon's overhead over its own limits (target <= 1.2);
- floor_seconds (``--floor``): the same requests sent by a bare aiohttp client under
  the same limiter (`mwapjobs.ratelimit.KeyedLimiter`, same settings), before the
  sweep: what this machine achieves at these limits with no daemon at all;
- max_concurrent_probes, max_provider_concurrent, max_provider_rps: peaks at the
  simulator, never above the limits;
- max_loop_lag_ms / p99_loop_lag_ms: a task sleeping 10 ms on the daemon's loop
  during the sweep (target <= 50 ms); max_loop_lag_db_idle_ms the worst among the
  samples during which the store ran no query (on the embedded store mongomock's
  queries are Python work in this process);
- where the time went: read_seconds, write_seconds and db_writes (batched result
  writes), db_round_trips (every query during the sweep), db_busy_seconds.

Store-bound (``*``): read_seconds, write_seconds, db_busy_seconds.

    python bench/health_sweep.py                        # 2,000 integrations, default limits
    python bench/health_sweep.py --integrations 10000   # about 4 minutes at 10/s per provider
    python bench/health_sweep.py --uri mongodb://127.0.0.1:27999 --json
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import subprocess
import sys
import time
from typing import Any

import aiohttp
import benchlib
from benchlib import INTEGRATION_STATE, INTEGRATIONS, PROVIDERS, ROOT, Store
from bson import ObjectId

from mwapjobs.config import Settings
from mwapjobs.crypto import MwapCipher
from mwapjobs.daemon import Daemon
from mwapjobs.ratelimit import KeyedLimiter
from mwapjobs.storage.mongo import Mongo

KEY = "bench-encryption-key-0123456789ab"
ADMIN_TOKEN = "bench-admin-token-0123456789abcdef"
KINDS = ("dropbox", "google", "microsoft", "generic")
LAG_INTERVAL = 0.01


class Simulator:
    """tests/support/providers.py in a child process."""

    def __init__(self, latency: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.providers", "--port", "0",
             "--latency", str(latency)],
            cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.startswith("PORT "):
            raise RuntimeError(f"simulator did not start: {line!r}")
        self.url = f"http://127.0.0.1:{int(line.split()[1])}"

    def metadata(self, kind: str, tag: str) -> dict[str, Any]:
        base = f"{self.url}/{tag}"
        return {
            "dropbox": {"providerType": "dropbox", "apiBaseUrl": f"{base}/dropbox/2"},
            "google": {"providerType": "google",
                       "healthCheckUrl": f"{base}/google/drive/v3/about?fields=user"},
            "microsoft": {"providerType": "microsoft",
                          "healthCheckUrl": f"{base}/graph/v1.0/me/drive"},
            "generic": {"providerType": "bench", "apiBaseUrl": f"{base}/generic/api"},
        }[kind]

    async def stats(self, http: aiohttp.ClientSession) -> dict[str, Any]:
        async with http.get(f"{self.url}/_stats") as resp:
            return dict(await resp.json())

    async def reset(self, http: aiohttp.ClientSession) -> None:
        async with http.post(f"{self.url}/_reset") as resp:
            await resp.read()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


class DbActivity:
    """Marks when the embedded store is executing a query (`Mongo.call` in flight): its
    queries are CPU work in this process, which competes with the event loop."""

    def __init__(self, mongo: Mongo) -> None:
        self.active = 0
        self.last_end = 0.0
        self.busy = 0.0
        original = mongo.call

        async def call(op: Any) -> Any:
            self.active += 1
            started = time.perf_counter()
            try:
                return await original(op)
            finally:
                self.active -= 1
                self.last_end = time.perf_counter()
                self.busy += self.last_end - started

        mongo.call = call  # type: ignore[method-assign]

    def during(self, since: float) -> bool:
        return self.active > 0 or self.last_end >= since


class LagMonitor:
    """A task sleeping LAG_INTERVAL in a loop; `worst` is its latest wake-up, `at` when
    (seconds after `start`), `p99` over all samples; `worst_db_idle` the latest among
    the samples during which the embedded store ran no query."""

    def __init__(self, db: DbActivity) -> None:
        self.db = db
        self.samples: list[float] = []
        self.worst = 0.0
        self.worst_db_idle = 0.0
        self.at = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.samples, self.worst, self.worst_db_idle, self.at = [], 0.0, 0.0, 0.0
        self._task = asyncio.ensure_future(self._run())

    @property
    def p99(self) -> float:
        ordered = sorted(self.samples)
        return ordered[int(0.99 * (len(ordered) - 1))] if ordered else 0.0

    async def _run(self) -> None:
        started = last = time.perf_counter()
        while True:
            await asyncio.sleep(LAG_INTERVAL)
            now = time.perf_counter()
            lag = now - last - LAG_INTERVAL
            self.samples.append(lag)
            if lag > self.worst:
                self.worst, self.at = lag, now - started
            if not self.db.during(last):
                self.worst_db_idle = max(self.worst_db_idle, lag)
            last = now

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


async def seed(mongo: Mongo, sim: Simulator, n: int, providers: int) -> None:
    cipher = MwapCipher(KEY)
    provider_ids = []
    docs: list[dict[str, Any]] = []
    for p in range(providers):
        kind = KINDS[p % len(KINDS)]
        oid = ObjectId()
        provider_ids.append(str(oid))
        docs.append({"_id": oid, "name": f"Bench {kind} {p}", "slug": f"bench-{kind}-{p}",
                     "tokenUrl": f"{sim.url}/token", "clientId": "cid",
                     "clientSecret": cipher.encrypt("secret"),
                     "metadata": sim.metadata(kind, f"p{p}")})
    await mongo.call(lambda db: db[PROVIDERS].insert_many(docs))
    now = time.time()
    integrations = []
    for i in range(n):
        integrations.append({
            "_id": str(ObjectId()), "tenantId": str(ObjectId()),
            "providerId": provider_ids[i % providers], "status": "active",
            "accessToken": cipher.encrypt(f"at-{i}"), "refreshToken": cipher.encrypt(f"rt-{i}"),
            "tokenExpiresAt": _utc(now + 3600), "updatedAt": _utc(now),
            "scopesGranted": ["files.read"], "metadata": {},
        })
    for start in range(0, n, 5000):
        chunk = integrations[start:start + 5000]
        await mongo.call(lambda db, chunk=chunk: db[INTEGRATIONS].insert_many(chunk))


def _utc(ts: float) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC)


async def floor(sim: Simulator, args: argparse.Namespace) -> float:
    """Seconds a bare aiohttp client takes for the same probes under the same limits:
    `concurrency` in flight, and per provider `provider_concurrency` and `provider_rate`
    (the daemon's own limiter class)."""
    limiter = KeyedLimiter(args.provider_concurrency, args.provider_rate)
    todo = [(f"p{i % args.providers}", i) for i in range(args.integrations)]
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession() as http:
        async def probe(tag: str) -> None:
            async with limiter.slot(tag), http.get(
                    f"{sim.url}/floor-{tag}/graph/v1.0/me/drive",
                    headers={"Authorization": "Bearer x"}, allow_redirects=False,
                    timeout=timeout) as resp:
                await resp.read()

        async def worker() -> None:
            while todo:
                tag, _ = todo.pop(0)
                await probe(tag)

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        return time.monotonic() - started


POLLS = 0


async def wait_finished(daemon: Daemon, run_id: str, timeout: float) -> dict[str, Any]:
    """The run once it finished (polled: one query every 0.2 s, counted in POLLS so that
    db_round_trips leaves them out)."""
    global POLLS
    deadline = time.monotonic() + timeout
    while True:
        POLLS += 1
        run = await daemon.operations.get_run(run_id)
        if run["state"] in ("completed", "failed") or time.monotonic() > deadline:
            return run
        await asyncio.sleep(0.2)


def ideal(args: argparse.Namespace) -> float:
    """The limits' best: per provider, its integrations spaced 1/rate apart (providers
    in parallel), then one latency; never less than N x latency / concurrency."""
    per_provider = -(-args.integrations // args.providers)
    rate_bound = (per_provider - 1) / args.provider_rate + args.latency
    concurrency_bound = args.integrations * args.latency / min(
        args.concurrency, args.providers * args.provider_concurrency)
    return max(rate_bound, concurrency_bound)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    sim = Simulator(args.latency)
    store = Store(args.uri, "health")
    mongo = store.mongo
    settings = Settings(
        mongodb_uri=store.settings_uri(), encryption_key=KEY,
        http={"host": "127.0.0.1", "port": 0}, outbound={"allow_loopback": True},
        log_level="error", alerting_enabled=False,
        refresh={"enabled": False},
        health={"concurrency": args.concurrency,
                "provider_concurrency": args.provider_concurrency,
                "provider_rate": args.provider_rate, "request_timeout": 15},
        admin={"tokens": [{"name": "bench",
                           "sha256": hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()}]},
    )
    daemon = Daemon(settings, mongo=mongo)
    db = DbActivity(mongo)
    lag = LagMonitor(db)
    try:
        floor_seconds = await floor(sim, args) if args.floor else None
        await seed(mongo, sim, args.integrations, args.providers)
        await daemon.start()
        await daemon.wait_ready(60)
        checker = getattr(daemon, "jobs", {}).get("health") or \
            getattr(daemon, "health_checker", None)
        assert checker is not None, "health checks are disabled?"
        async with aiohttp.ClientSession() as http:
            await sim.reset(http)
            trips = mongo.round_trips
            db.busy = 0.0
            lag.start()
            started = time.monotonic()
            async with http.post(
                    f"http://127.0.0.1:{daemon.port}/api/v1/integrations/health/check",
                    headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
                body = await resp.json()
            if resp.status != 202:
                raise RuntimeError(f"check request failed: {resp.status} {body}")
            run_id = body["data"]["runId"]
            outcome = await wait_finished(daemon, run_id, args.timeout)
            wall = time.monotonic() - started
            await lag.stop()
            trips = mongo.round_trips - trips - POLLS
            stats = await sim.stats(http)
        result = outcome.get("result") or {}
        recorded = await mongo.call(lambda db: db[INTEGRATION_STATE].count_documents(
            {"health.history.0": {"$exists": True}}))
        best = ideal(args)
        return {
            "integrations": args.integrations,
            "checked": int(result.get("checked", 0)),
            "sweep_seconds": round((outcome.get("durationMs") or wall * 1000) / 1000, 3),
            "max_concurrent_probes": int(stats["peak"]),
            "max_provider_rps": max(stats["maxRateByTag"].values(), default=0),
            "max_loop_lag_ms": round(lag.worst * 1000, 1),
            "max_loop_lag_at_s": round(lag.at, 2),
            "p99_loop_lag_ms": round(lag.p99 * 1000, 1),
            "max_loop_lag_db_idle_ms": round(lag.worst_db_idle * 1000, 1),
            "db_busy_seconds": round(db.busy, 3),
            "ideal_seconds": round(best, 3),
            "sweep_vs_ideal": round((outcome.get("durationMs") or wall * 1000) / 1000 / best, 3),
            "store": store.label,
            "floor_seconds": None if floor_seconds is None else round(floor_seconds, 3),
            "healthy": int(result.get("healthy", 0)),
            "recorded": int(recorded),
            "run_state": outcome.get("state"),
            "wall_seconds": round(wall, 3),
            "read_seconds": result.get("readSeconds"),
            "write_seconds": result.get("writeSeconds"),
            "db_writes": result.get("writes"),
            "db_round_trips": trips,
            "daemon_max_in_flight": getattr(checker, "max_in_flight", None),
            "daemon_max_provider_in_flight": getattr(getattr(checker, "limiter", None),
                                                     "max_in_flight", None),
            "max_provider_concurrent": max(stats["peakByTag"].values(), default=0),
            "simulator_requests": stats["count"],
            "limits": {"concurrency": args.concurrency,
                       "provider_concurrency": args.provider_concurrency,
                       "provider_rate": args.provider_rate, "providers": args.providers,
                       "latency_ms": args.latency * 1000},
        }
    finally:
        await lag.stop()
        await daemon.stop()
        sim.stop()
        store.drop()


def verdicts(r: dict[str, Any]) -> dict[str, bool]:
    limits = r["limits"]
    return {
        "all checked": r["checked"] == r["integrations"] == r["healthy"] == r["recorded"],
        "concurrency within limit": r["max_concurrent_probes"] <= limits["concurrency"],
        "per-provider concurrency within limit":
            r["max_provider_concurrent"] <= limits["provider_concurrency"],
        "per-provider rate within limit (+1 for jitter at a window's edge)":
            r["max_provider_rps"] <= limits["provider_rate"] + 1,
        "sweep within 20% of the rate-bound ideal": r["sweep_seconds"] <= 1.2 * r["ideal_seconds"],
        "loop lag <= 50 ms": r["max_loop_lag_ms"] <= 50.0,
    }


STORE_BOUND = {"read_seconds", "write_seconds", "db_busy_seconds"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--integrations", type=int, default=2_000)
    parser.add_argument("--latency", type=float, default=0.02, help="seconds per answer")
    parser.add_argument("--concurrency", type=int, default=20,
                        help="health.concurrency (default: the daemon's, 20)")
    parser.add_argument("--providers", type=int, default=4)
    parser.add_argument("--provider-concurrency", type=int, default=5,
                        help="health.provider_concurrency (default: the daemon's, 5)")
    parser.add_argument("--provider-rate", type=float, default=10.0,
                        help="health.provider_rate, starts per second (default: the daemon's, 10)")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--floor", action="store_true",
                        help="first time a bare aiohttp client under the same limits")
    parser.add_argument("--uri", help="run on this MongoDB-wire server (default: embedded)")
    parser.add_argument("--save", help="also write the JSON result to this file")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    benchlib.quiet_logging()
    load_start = benchlib.loadavg()
    result = asyncio.run(run(args))
    result.update(load_start=load_start, load_end=benchlib.loadavg(),
                  command=" ".join(["python", *sys.argv]))
    checks = verdicts(result)
    if args.save:
        with open(args.save, "w") as out:
            json.dump({**result, "targets": checks}, out, default=str, indent=1)
    if args.json:
        print(json.dumps({**result, "targets": checks, "pass": all(checks.values())}))
    else:
        print(f"store: {result['store']}; load average at start {load_start}, at end "
              f"{result['load_end']} (* store-bound)")
        for key, value in result.items():
            if key in ("store", "load_start", "load_end", "command"):
                continue
            star = "*" if key in STORE_BOUND else ""
            print(f"{key + star:>26}: {value}")
        vs_ideal = benchlib.ratio(result["sweep_seconds"], result["ideal_seconds"])
        vs_floor = benchlib.ratio(result["sweep_seconds"], result["floor_seconds"])
        print(f"{'sweep / ideal':>26}: {vs_ideal}" + (
            f"; sweep / bare client under the same limits: {vs_floor}"
            if result.get("floor_seconds") else ""))
        for name, passed in checks.items():
            print(f"{'PASS' if passed else 'FAIL'}  {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
