"""Analytics benchmark: the daily run for 10,000 tenants and 100,000 integrations, next
to the same run at one tenth of the size, measured in the same invocation.

Setup, per size (a fresh database each: embedded by default, ``--uri`` for a server):
- ``--tenants`` tenants, ``--integrations`` integrations spread evenly over them and
  over three providers (Dropbox, Google Drive, Microsoft Graph), 85 % active, 8 %
  expired, 5 % error, 2 % revoked, nine in ten of the non-revoked ones connected (an
  encrypted access token, as the backend stores it); two projects per tenant with three
  members each; a health note per connected integration; the file index's summary
  of every project (`mwapjobs_file_index`, as jobs/files/ keeps it); the day's
  refresh counters of every tenant;
- the storage-quota simulator (tests/support/quota_providers.py) in its own process,
  answering after ``--latency`` (default 0: the daemon's own cost is what is measured);
- the full daemon (`Daemon`) with only analytics on, its quota limits raised
  (``--quota-rate`` per provider, default 100,000/s, 32 in flight per provider), so the
  figure is the machinery, not a rate limit (at the default 10/s per provider, the quota
  of 100,000 integrations takes about an hour by design).

Then one daily run (`Analytics.run`, what the 23:55 repeat runs) is awaited.

Figures (``--json`` prints one object with both sizes and the ratios):
- seconds: the whole run; quota_seconds and snapshot_seconds: its two phases;
  rerun_seconds: the snapshot phase once more for the same day (every snapshot is
  there already: the replacing path);
- round_trips: every query of the run (`Mongo.round_trips`); snapshot_round_trips: those
  of the snapshot phase alone (the aggregations and the batched writes: the figure that
  must not grow with the tenants, apart from one write per 1,000 snapshots);
- quota_requests: requests the simulator answered; quota_states: the readings by state;
- max_loop_lag_ms: a task sleeping 10 ms on the daemon's loop during the run;
- ratio_*: full size over one tenth (10x the data; linear growth is a ratio of 10).

Store-bound: on the embedded store every aggregation is mongomock's Python code (in a
thread of this process), so its seconds say how fast mongomock groups documents; round
trips are the portable figure.

    python bench/analytics.py                              # 10,000 tenants, 100,000 integrations
    python bench/analytics.py --tenants 2000 --integrations 20000 --json
    python bench/analytics.py --uri mongodb://127.0.0.1:27999 --tenants 1000 --integrations 10000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mongomock
import pymongo
from bson import ObjectId

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mwapjobs.config import Settings  # noqa: E402
from mwapjobs.crypto import MwapCipher  # noqa: E402
from mwapjobs.daemon import Daemon  # noqa: E402
from mwapjobs.jobs.analytics.daily import Analytics  # noqa: E402
from mwapjobs.storage.mongo import Mongo  # noqa: E402

KEY = "bench-encryption-key-0123456789ab"
KINDS = ("dropbox", "google", "microsoft")
STATUSES = ["active"] * 85 + ["expired"] * 8 + ["error"] * 5 + ["revoked"] * 2
CHUNK = 5000


class Simulator:
    """The quota simulator in a child process."""

    def __init__(self, latency: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.quota_providers", "--port", "0",
             "--latency", str(latency)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"the simulator did not start: {line!r}")
        self.url = f"http://127.0.0.1:{int(line.split()[1])}"

    def metadata(self, kind: str) -> dict[str, Any]:
        base = f"{self.url}/{kind}"
        if kind == "dropbox":
            return {"providerType": "dropbox", "apiBaseUrl": f"{base}/dropbox/2"}
        if kind == "google":
            return {"providerType": "google",
                    "quotaUrl": f"{base}/google/drive/v3/about?fields=storageQuota"}
        return {"providerType": "microsoft", "quotaUrl": f"{base}/graph/v1.0/me/drive"}

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


class Lag:
    """The worst overshoot of a 10 ms sleep on the loop, while running."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            start = time.perf_counter()
            await asyncio.sleep(0.01)
            self.worst = max(self.worst, time.perf_counter() - start - 0.01)

    def __enter__(self) -> Lag:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()


def seed_docs(tenants: int, integrations: int, sim: Simulator, day: str) -> dict[str, list[Any]]:
    cipher = MwapCipher(KEY)
    now = datetime.now(UTC)
    providers = [{"_id": ObjectId(), "name": kind.title(), "slug": kind, "tokenUrl":
                  "https://token.invalid/oauth2/token", "clientId": "c",
                  "clientSecret": cipher.encrypt("s"), "metadata": sim.metadata(kind),
                  "createdAt": now, "updatedAt": now} for kind in KINDS]
    tenant_ids = [ObjectId() for _ in range(tenants)]
    tenant_docs = [{"_id": t, "name": f"Tenant {n}", "ownerId": f"auth0|owner-{n}",
                    "createdAt": now} for n, t in enumerate(tenant_ids)]
    token = cipher.encrypt("at-bench")  # one ciphertext: decrypting it costs the same
    integ, notes = [], []
    for n in range(integrations):
        tenant = str(tenant_ids[n % tenants])
        provider = providers[n % len(KINDS)]
        status = STATUSES[n % len(STATUSES)]
        connected = status != "revoked" and n % 10 != 9
        iid = str(ObjectId())
        integ.append({"_id": iid, "tenantId": tenant, "providerId": str(provider["_id"]),
                      "status": status, "accessToken": token if connected else None,
                      "refreshToken": token if connected else None, "createdAt": now,
                      "updatedAt": now})
        if connected:
            notes.append({"_id": iid, "health": {"tenantId": tenant,
                                                 "providerId": str(provider["_id"]),
                                                 "lastResult": {"outcome": "healthy"}}})
    projects, summaries, activity = [], [], []
    for n, t in enumerate(tenant_ids):
        for p in range(2):
            pid = str(ObjectId())
            projects.append({"_id": pid, "tenantId": str(t), "name": f"P{p}",
                             "archived": p == 1, "members": [
                                 {"userId": f"u{n}-{m}", "role": "MEMBER"} for m in range(3)]})
            summaries.append({"_id": pid, "tenantId": str(t), "state": "synced",
                              "fileCount": 100, "folderCount": 10, "totalSize": 100_000})
        activity.append({"_id": f"{t}|{day}", "tenantId": str(t), "day": day,
                         "refresh": {"refreshed": 24, "transientFailure": 1}})
    return {"cloudProviders": providers, "tenants": tenant_docs,
            "cloudProviderIntegrations": integ, "mwapjobs_integrations": notes,
            "projects": projects, "mwapjobs_file_index": summaries,
            "mwapjobs_analytics_activity": activity}


async def one_size(tenants: int, integrations: int, args: argparse.Namespace,
                   sim: Simulator) -> dict[str, Any]:
    day = datetime.now(UTC).date().isoformat()
    name = f"bench_analytics_{os.getpid()}_{secrets.token_hex(3)}"
    sync: Any
    if args.uri:
        sync = pymongo.MongoClient(args.uri, tz_aware=True)
        mongo = Mongo.connect(args.uri, db_name=name)
    else:
        sync = mongomock.MongoClient(tz_aware=True)
        mongo = Mongo.from_clients(sync, name)
    started = time.monotonic()
    for collection, docs in seed_docs(tenants, integrations, sim, day).items():
        for start in range(0, len(docs), CHUNK):
            sync[name][collection].insert_many(docs[start:start + CHUNK])
    seed_seconds = time.monotonic() - started
    limits = {"provider_concurrency": 32, "provider_rate": args.quota_rate}
    settings = Settings(
        mongodb_uri=args.uri or "memory://", encryption_key=KEY, http={"port": 0},
        refresh={"enabled": False, **limits}, health={"enabled": False, **limits},
        maintenance={"enabled": False}, notifications={"enabled": False},
        outbound={"allow_loopback": True},
        analytics={"quota": not args.no_quota, "quota_concurrency": 64,
                   "quota_provider_concurrency": 32, "quota_provider_rate": args.quota_rate})
    daemon = Daemon(settings, mongo=mongo)
    try:
        await daemon.start()
        await daemon.wait_ready(60)
        job = daemon.jobs["analytics"]
        assert isinstance(job, Analytics)
        before = mongo.round_trips
        with Lag() as lag:
            report = await job.run(day)
        total_trips = mongo.round_trips - before
        snapshot_before = mongo.round_trips
        rerun = await job.snapshots(day, datetime.now(UTC))  # the snapshot phase again
        snapshot_trips = mongo.round_trips - snapshot_before
        written = sync[name]["mwapjobs_analytics_daily"].count_documents({"day": day})
        platform = sync[name]["mwapjobs_analytics_daily"].find_one({"_id": f"platform:{day}"})
    finally:
        await daemon.stop()
        await mongo.aclose()
        if args.uri:
            sync.drop_database(name)
        sync.close()
    quota = report.get("quota") or {}
    return {
        "tenants": tenants, "integrations": integrations, "seed_seconds": round(seed_seconds, 2),
        "seconds": report["seconds"], "quota_seconds": quota.get("seconds"),
        "snapshot_seconds": report["snapshotSeconds"], "rerun_seconds": rerun["seconds"],
        "rerun_replaced": rerun["replaced"], "round_trips": total_trips,
        "snapshot_round_trips": snapshot_trips, "snapshots_written": written,
        "quota_integrations": quota.get("integrations"),
        "quota_states": quota.get("byState"),
        "max_loop_lag_ms": round(lag.worst * 1000, 1),
        "platform_integrations": (platform or {}).get("integrations", {}).get("total"),
    }


def ratio(a: Any, b: Any) -> float | None:
    if isinstance(a, int | float) and isinstance(b, int | float) and b:
        return round(a / b, 2)
    return None


async def main(args: argparse.Namespace) -> dict[str, Any]:
    load_start = [round(x, 2) for x in os.getloadavg()]
    sim = Simulator(args.latency)
    try:
        tenth = await one_size(max(1, args.tenants // 10), max(1, args.integrations // 10),
                               args, sim)
        full = await one_size(args.tenants, args.integrations, args, sim)
    finally:
        sim.stop()
    keys = ("seconds", "quota_seconds", "snapshot_seconds", "rerun_seconds", "round_trips",
            "snapshot_round_trips")
    return {"store": "server" if args.uri else "embedded (mongomock)", "full": full,
            "tenth": tenth, **{f"ratio_{k}": ratio(full[k], tenth[k]) for k in keys},
            "loadavg_start": load_start, "loadavg": [round(x, 2) for x in os.getloadavg()]}


def table(result: dict[str, Any]) -> str:
    rows = [("", "1/10", "full", "ratio")]
    for key in ("tenants", "integrations", "seconds", "quota_seconds", "snapshot_seconds",
                "rerun_seconds", "rerun_replaced", "round_trips", "snapshot_round_trips",
                "snapshots_written",
                "quota_integrations", "max_loop_lag_ms"):
        rows.append((key, str(result["tenth"][key]), str(result["full"][key]),
                     str(result.get(f"ratio_{key}") or "")))
    width = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(width[i]) if i == 0 else c.rjust(width[i])
                       for i, c in enumerate(r)) for r in rows]
    return (f"analytics daily run, store: {result['store']}, loadavg "
            f"{result['loadavg_start']} -> {result['loadavg']}\n"
            + "\n".join(lines) + f"\nquota readings (full): {result['full']['quota_states']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=10_000)
    parser.add_argument("--integrations", type=int, default=100_000)
    parser.add_argument("--uri", help="a MongoDB-wire server (a database of its own, dropped)")
    parser.add_argument("--latency", type=float, default=0.0,
                        help="seconds each quota answer takes at the simulator")
    parser.add_argument("--quota-rate", type=float, default=100_000.0,
                        help="quota requests per second per provider")
    parser.add_argument("--no-quota", action="store_true", help="the snapshot phase only")
    parser.add_argument("--json", action="store_true", help="one JSON object")
    parser.add_argument("--save", metavar="FILE", help="also write the JSON object here")
    options = parser.parse_args()
    logging.disable(logging.WARNING)
    outcome = asyncio.run(main(options))
    if options.save:
        Path(options.save).write_text(json.dumps(outcome, indent=1) + "\n")
    print(json.dumps(outcome) if options.json else table(outcome))
