"""Health-sweep benchmark: N integrations checked in one on-demand sweep.

Setup:
- a provider simulator (tests/support/providers.py) in its own process, playing
  Dropbox, Google Drive, Microsoft Graph and a generic API, each answer after
  ``--latency`` (default 20 ms);
- the full daemon (`Daemon`) on the embedded store (mongomock, as with
  ``MONGODB_URI=memory://``), with ``--integrations`` (default 10,000) connected
  integrations spread evenly over ``--providers`` providers (one per kind,
  then more of each), every access token encrypted as the backend stores it;
- token refresh is off: its discovery would schedule 10,000 refresh runs on
  the same embedded store, which is another benchmark (bench/refresh_fleet.py).

Then one sweep is started the way an operator does it,
``POST /api/v1/integrations/health/check`` (spreading off), and awaited.

Figures (``--json`` prints them as one object):
- integrations, checked: integrations seeded, and checked by the sweep (the run's
  result; every one must also have one history entry in MongoDB, verified);
- sweep_seconds: the sweep run's own duration (reads, probes, result writes);
- ideal_seconds: integrations x latency / concurrency, the best the global
  limit allows; the target is sweep_seconds within 20 % of it;
- floor_seconds: the same number of requests sent by a bare aiohttp client
  with the same concurrency to the same simulator, before the sweep: what this
  machine can do at all (HTTP client and simulator CPU, timer rounding), so
  sweep_seconds / floor_seconds is the daemon's own overhead (``--no-floor``
  skips it);
- max_concurrent_probes: the peak of requests in flight at the simulator
  (and the daemon's own count), never above ``--concurrency``;
- max_provider_rps: the most requests one provider received within any one
  second, never above ``--provider-rate``; max_provider_concurrent likewise
  against ``--provider-concurrency``;
- max_loop_lag_ms: how late a task sleeping 10 ms woke up, at worst, during the
  sweep (target <= 50 ms); max_loop_lag_at_s says when (seconds after the
  request), p99_loop_lag_ms how it usually is, and max_loop_lag_db_idle_ms the
  worst among the samples during which the embedded store ran no query at all
  (mongomock's queries are Python CPU work in this process: the GIL they hold
  delays the loop; a real MongoDB does that work in its own process);
- where the time went: read_seconds (the three start-up queries),
  write_seconds and db_writes (batched result writes, overlapping the probes),
  db_round_trips (every query of the daemon during the sweep), db_busy_seconds
  (time with a query in flight, overlapping).

    python bench/health_sweep.py                      # 10,000 integrations, table
    python bench/health_sweep.py --integrations 2000 --json
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import mongomock
from bson import ObjectId

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mwapjobs.config import Settings  # noqa: E402
from mwapjobs.crypto import MwapCipher  # noqa: E402
from mwapjobs.daemon import Daemon  # noqa: E402
from mwapjobs.storage.mongo import Mongo  # noqa: E402
from mwapjobs.storage.names import INTEGRATION_STATE, INTEGRATIONS, PROVIDERS  # noqa: E402

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


async def floor(sim: Simulator, n: int, concurrency: int) -> float:
    """Seconds a bare aiohttp client takes for `n` probes, `concurrency` at a time."""
    url = f"{sim.url}/floor/graph/v1.0/me/drive"
    left = n
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession() as http:
        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                async with http.get(url, headers={"Authorization": "Bearer x"},
                                    allow_redirects=False, timeout=timeout) as resp:
                    await resp.read()

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.monotonic() - started


async def run(args: argparse.Namespace) -> dict[str, Any]:
    sim = Simulator(args.latency)
    mongo = Mongo.from_clients(mongomock.MongoClient(tz_aware=True))
    settings = Settings(
        mongodb_uri="memory://", encryption_key=KEY, http={"host": "127.0.0.1", "port": 0},
        log_level="warning", alerting_enabled=False,
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
        floor_seconds = None if args.no_floor else await floor(sim, args.integrations,
                                                               args.concurrency)
        await seed(mongo, sim, args.integrations, args.providers)
        await daemon.start()
        await daemon.wait_ready(60)
        checker = daemon.health_checker
        assert checker is not None
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
            outcome = await daemon.operations.wait_finished(run_id, args.timeout)
            wall = time.monotonic() - started
            await lag.stop()
            trips = mongo.round_trips - trips
            stats = await sim.stats(http)
        result = outcome.get("result") or {}
        recorded = await mongo.call(lambda db: db[INTEGRATION_STATE].count_documents(
            {"health.history.0": {"$exists": True}}))
        ideal = args.integrations * args.latency / args.concurrency
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
            "ideal_seconds": round(ideal, 3),
            "floor_seconds": None if floor_seconds is None else round(floor_seconds, 3),
            "healthy": int(result.get("healthy", 0)),
            "recorded": int(recorded),
            "run_state": outcome.get("state"),
            "wall_seconds": round(wall, 3),
            "read_seconds": result.get("readSeconds"),
            "write_seconds": result.get("writeSeconds"),
            "db_writes": result.get("writes"),
            "db_round_trips": trips,
            "daemon_max_in_flight": checker.max_in_flight,
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
        mongo.close()
        sim.stop()


def verdicts(r: dict[str, Any]) -> dict[str, bool]:
    limits = r["limits"]
    return {
        "all checked": r["checked"] == r["integrations"] == r["healthy"] == r["recorded"],
        "concurrency within limit": r["max_concurrent_probes"] <= limits["concurrency"],
        "per-provider concurrency within limit":
            r["max_provider_concurrent"] <= limits["provider_concurrency"],
        "per-provider rate within limit": r["max_provider_rps"] <= limits["provider_rate"],
        "sweep within 20% of ideal": r["sweep_seconds"] <= 1.2 * r["ideal_seconds"],
        "loop lag <= 50 ms": r["max_loop_lag_ms"] <= 50.0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--integrations", type=int, default=10_000)
    parser.add_argument("--latency", type=float, default=0.02, help="seconds per answer")
    parser.add_argument("--concurrency", type=int, default=20, help="health.concurrency")
    parser.add_argument("--providers", type=int, default=4)
    parser.add_argument("--provider-concurrency", type=int, default=10,
                        help="health.provider_concurrency")
    parser.add_argument("--provider-rate", type=float, default=1000.0,
                        help="health.provider_rate (starts per second)")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--no-floor", action="store_true",
                        help="skip the bare-client baseline (floor_seconds)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    os.environ.pop("MWAPJOBS_CONFIG", None)
    result = asyncio.run(run(args))
    checks = verdicts(result)
    if args.json:
        print(json.dumps({**result, "pass": all(checks.values())}))
    else:
        for key, value in result.items():
            print(f"{key:>26}: {value}")
        for name, passed in checks.items():
            print(f"{'PASS' if passed else 'FAIL'}  {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
