"""File-index benchmark: N files across P projects indexed by one sweep (a full pass
each), then an incremental sweep with nothing changed, against the rate- and
latency-bound ideal measured in the same run.

Setup:
- the file-API simulators (tests/support/file_providers.py) in their own process, one
  account each for Dropbox, Google Drive and Microsoft Graph, every answer after
  ``--latency`` seconds (default 0.5 s: a page of 1,000 items takes providers about that
  long), pages of at most ``--page-size`` items (default 1,000, Drive's maximum);
- the full daemon (`Daemon`) on the store (embedded by default, ``--uri`` for a server)
  with file indexing on: ``--projects`` projects spread over the three providers, each
  on an integration of its own (tokens encrypted as the backend stores them), each with
  ``--files`` / ``--projects`` files in its folder `/Projects/P<n>`; refresh and health
  checks off; ``files.concurrency`` = 3 providers x ``--provider-concurrency``.

Then one sweep is added as the repeat would add it (spreading off), and every
project's pass is awaited; then a second sweep, with no change at the providers.

Figures (``--json`` prints them as one object):
- files, projects, files_indexed: seeded, and found in `virtualFiles` afterwards;
- pass_seconds: from the sweep's run being added to the last project's pass done;
- pages: the listing pages the protocols need at least (per project: Dropbox and Graph
  ``ceil((files + 1) / page)``, the folder itself being the first item; Drive
  ``ceil(files / page)`` plus one name lookup per path segment and one start page
  token); ideal_seconds: the better of the two bounds the limits set, pages x latency /
  allowed concurrency, and each provider's pages / provider rate; ratio_to_ideal =
  pass_seconds / ideal_seconds (target <= 1.3);
- requests, requests_per_1000_files: what the simulator received in the full sweep;
- round_trips_per_1000_files: the daemon's MongoDB queries (`Mongo.round_trips`, every
  one of them, the engine's included) during the full sweep, per 1,000 files;
  on a server also wire_commands_per_1000_files (every command the drivers sent);
- incremental_requests_per_project: requests of the second sweep / projects (target 1),
  incremental_seconds;
- peak_rss_mb (``ru_maxrss``, target < 200 MB), rss_before_mb (the daemon started,
  everything seeded), store_mb: on the embedded store, what the store's own documents
  grow a process by (as many documents of the shape the daemon wrote, in a fresh
  process, in mongomock indexed as the daemon's store is; the store lives in this
  process, a server's does not); peak_rss_without_store_mb = peak_rss_mb - store_mb;
- cpu_seconds, cpu_per_pass_second: this process's CPU (every thread, the embedded
  store's included) during the full sweep; loadavg_start, loadavg_end: the machine's
  (a pass far from the ideal with cpu_per_pass_second well below 1 on a loaded
  machine waited for a CPU, not for the providers);
- with ``--timeline``: every request of the full sweep (account, route, arrival).

    python bench/file_index.py                                  # 100,000 files, 50 projects
    python bench/file_index.py --files 10000 --projects 10 --latency 0.2
    python bench/file_index.py --uri mongodb://127.0.0.1:27999 --json
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from typing import Any

import benchlib
from benchlib import ROOT, Store
from bson import ObjectId

from mwapjobs.config import Settings
from mwapjobs.crypto import MwapCipher
from mwapjobs.daemon import Daemon
from mwapjobs.jobs.files.schedule import QUEUE

KEY = "bench-encryption-key-0123456789ab"
KINDS = ("dropbox", "google", "microsoft")
ROUTES = {"dropbox": "dropbox/2", "google": "drive/v3", "microsoft": "graph/v1.0"}
VIRTUAL_FILES = "virtualFiles"  # literals: the bench must not follow renames
PROJECTS, INTEGRATIONS, PROVIDERS, TENANTS = ("projects", "cloudProviderIntegrations",
                                              "cloudProviders", "tenants")


class Simulator:
    """tests/support/file_providers.py in a child process."""

    def __init__(self, latency: float, page: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.file_providers", "--port", "0",
             "--latency", str(latency), "--max-page", str(page)],
            cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        self.url = f"http://127.0.0.1:{line[1]}"

    def call(self, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.url}{path}", data=data,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as answer:
            return json.loads(answer.read())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def min_pages(kind: str, files: int, page: int, folder_depth: int) -> int:
    if kind == "google":
        return math.ceil(files / page) + folder_depth + 1
    return math.ceil((files + 1) / page)


def store_mb(files: int, projects: int, sample: dict[str, Any]) -> float:
    """How much `files` documents shaped like `sample` (one the daemon wrote) grow a
    fresh process's RSS in the embedded store as the daemon opens it (mongomock with
    the hash indexes of `Mongo.from_clients`), measured in a child process so that this
    one's heap (freed pages reused) does not blur it."""
    template = json.dumps(sample, default=str)
    answer = subprocess.run([sys.executable, __file__, "--store-child", str(files),
                             str(projects)], input=template, capture_output=True, text=True,
                            check=True, cwd=ROOT)
    return float(answer.stdout.split()[-1])


def store_child(files: int, projects: int) -> None:
    import mongomock

    from mwapjobs.storage.mongo import Mongo

    sample = json.loads(sys.stdin.read())
    gc.collect()
    before = benchlib.rss_mb()
    client = mongomock.MongoClient(tz_aware=True)
    Mongo.from_clients(client, "mwap")  # indexes the collections as the daemon's store does
    collection = client["mwap"][VIRTUAL_FILES]
    now = datetime.now(UTC)
    for start in range(0, files, 1000):
        batch = []
        for n in range(start, min(files, start + 1000)):
            doc = {**sample, "_id": f"{n:024x}", "projectId": f"{n % projects:024x}",
                   "providerFileId": f"id:{n:020d}", "name": f"f{n:06d}.bin",
                   "path": f"{sample.get('path', '/')}{n}", "modifiedTime": now,
                   "createdAt": now, "updatedAt": now,
                   "syncStatus": {"lastSync": now, "status": "synced"}}
            batch.append(doc)
        collection.insert_many(batch)
    gc.collect()
    print(round(benchlib.rss_mb() - before, 1))


async def seed(store: Store, sim: Simulator, args: argparse.Namespace
               ) -> tuple[list[str], dict[str, int]]:
    cipher = MwapCipher(KEY)
    mongo = store.mongo
    tenant = ObjectId()
    await mongo.call(lambda db: db[TENANTS].insert_one({"_id": tenant, "ownerId": "auth0|b"}))
    providers: dict[str, str] = {}
    for kind in KINDS:
        oid = ObjectId()
        providers[kind] = str(oid)
        doc = {"_id": oid, "name": f"Bench {kind}", "slug": f"bench-{kind}",
               "tokenUrl": "https://oauth.invalid/token", "clientId": "c",
               "clientSecret": cipher.encrypt("s"),
               "metadata": {"providerType": kind,
                            "filesApiBaseUrl": f"{sim.url}/{kind}/{ROUTES[kind]}"}}
        await mongo.call(lambda db, doc=doc: db[PROVIDERS].insert_one(doc))
    per = args.files // args.projects
    projects, pages = [], {k: 0 for k in KINDS}
    for n in range(args.projects):
        kind = KINDS[n % len(KINDS)]
        files = per + (1 if n < args.files % args.projects else 0)
        folder = f"/Projects/P{n}"
        sim.call("/_seed", {"tag": kind, "folder": folder, "files": files})
        pages[kind] += min_pages(kind, files, args.page_size, 2)
        integration = str(ObjectId())
        await mongo.call(lambda db, i=integration, k=kind: db[INTEGRATIONS].insert_one({
            "_id": i, "tenantId": str(tenant), "providerId": providers[k],
            "accessToken": cipher.encrypt(f"at-{i}"), "refreshToken": cipher.encrypt("rt"),
            "status": "active"}))
        pid = str(ObjectId())
        projects.append(pid)
        await mongo.call(lambda db, p=pid, i=integration, f=folder: db[PROJECTS].insert_one({
            "_id": p, "tenantId": str(tenant), "cloudIntegrationId": i, "folderpath": f,
            "name": f, "archived": False}))
    return projects, pages


async def sweep(daemon: Daemon, projects: list[str]) -> float:
    """Add a sweep; seconds until every project's pass finished."""
    left = set(projects)
    done = asyncio.Event()
    failures: list[Any] = []

    def listener(event: str, run: dict[str, Any]) -> None:
        project = (run.get("data") or {}).get("projectId")
        if run.get("queue") == QUEUE and event in ("completed", "failed") and project in left:
            if event == "failed":
                failures.append(run.get("error"))
            left.discard(project)
            if not left:
                done.set()

    unsubscribe = daemon.engine.subscribe(listener)
    started = time.monotonic()
    await daemon.engine.add(QUEUE, {"sweep": True, "spread": False}, job_id="sweep")
    await asyncio.wait_for(done.wait(), 3600)
    unsubscribe()
    if failures:
        raise RuntimeError(f"{len(failures)} passes failed, first: {failures[0]}")
    return time.monotonic() - started


async def run(args: argparse.Namespace) -> dict[str, Any]:
    sim = Simulator(args.latency, args.page_size)
    store = Store(args.uri, "file_index")
    try:
        projects, pages = await seed(store, sim, args)
        concurrency = len(KINDS) * args.provider_concurrency
        settings = Settings(
            mongodb_uri=store.settings_uri(), encryption_key=KEY, http={"port": 0},
            refresh={"enabled": False}, health={"enabled": False},
            outbound={"allow_loopback": True},
            files={"enabled": True, "page_size": args.page_size, "concurrency": concurrency,
                   "provider_concurrency": args.provider_concurrency,
                   "provider_rate": args.provider_rate, "interval": 86400,
                   "request_timeout": 120})
        daemon = Daemon(settings, mongo=store.mongo)
        await daemon.start()
        await daemon.wait_ready()
        await asyncio.sleep(1.0)  # the indexes, the schedule
        gc.collect()
        rss_before = benchlib.rss_mb()
        trips, wire = store.mongo.round_trips, store.wire.total if store.wire else 0
        requests = sim.call("/_stats")["requests"]
        load_start, cpu = benchlib.loadavg(), time.process_time()
        seconds = await sweep(daemon, projects)
        cpu = time.process_time() - cpu
        full_requests = sim.call("/_stats")["requests"] - requests
        full_trips = store.mongo.round_trips - trips
        full_wire = (store.wire.total - wire) if store.wire else None
        indexed = await store.mongo.call(lambda db: db[VIRTUAL_FILES].count_documents(
            {"type": {"$ne": "inode/directory"}}))
        sample = await store.mongo.call(lambda db: db[VIRTUAL_FILES].find_one(
            {"type": {"$ne": "inode/directory"}}, {"_id": 0}))
        timeline = sim.call("/_stats?timeline=1")["timeline"] if args.timeline else None
        requests = sim.call("/_stats")["requests"]
        incremental = await sweep(daemon, projects)
        incremental_requests = sim.call("/_stats")["requests"] - requests
        peak = benchlib.peak_rss_mb()
        await daemon.stop()
    finally:
        sim.stop()
        store.drop()
    total_pages = sum(pages.values())
    by_latency = total_pages * args.latency / concurrency
    by_rate = max(p / args.provider_rate for p in pages.values())
    ideal = max(by_latency, by_rate)
    thousands = args.files / 1000
    result: dict[str, Any] = {
        "store": store.label, "files": args.files, "projects": args.projects,
        "files_indexed": indexed, "latency": args.latency, "page_size": args.page_size,
        "allowed_concurrency": concurrency, "provider_rate": args.provider_rate,
        "pages": total_pages, "pass_seconds": round(seconds, 2),
        "ideal_seconds": round(ideal, 2), "ratio_to_ideal": round(seconds / ideal, 3),
        "requests": full_requests,
        "requests_per_1000_files": round(full_requests / thousands, 2),
        "round_trips_per_1000_files": round(full_trips / thousands, 1),
        "wire_commands_per_1000_files": round(full_wire / thousands, 1)
        if full_wire is not None else None,
        "incremental_requests_per_project": round(incremental_requests / args.projects, 3),
        "incremental_seconds": round(incremental, 2),
        "peak_rss_mb": peak, "rss_before_mb": rss_before,
        # The daemon's CPU (every thread: the embedded store's too) during the full
        # sweep, per second of it: near the cores this process gets, the pass is CPU-bound
        # (on a shared machine, look at the load averages beside it).
        "cpu_seconds": round(cpu, 2), "cpu_per_pass_second": round(cpu / seconds, 2),
        "loadavg_start": load_start, "loadavg_end": benchlib.loadavg(),
    }
    if timeline is not None:
        result["timeline"] = timeline  # (account, route, arrival) of every request
    if args.uri is None:
        result["store_mb"] = store_mb(args.files, args.projects, sample or {})
        result["peak_rss_without_store_mb"] = round(peak - result["store_mb"], 1)
    return result


def verdicts(r: dict[str, Any]) -> list[tuple[str, bool]]:
    rss = r.get("peak_rss_without_store_mb", r["peak_rss_mb"])
    return [("every file indexed", r["files_indexed"] == r["files"]),
            ("within 1.3x of the ideal", r["ratio_to_ideal"] <= 1.3),
            ("peak RSS under 200 MB" + (" (the embedded store's documents apart)"
                                        if "store_mb" in r else ""), rss < 200),
            ("an unchanged incremental pass costs one request per project",
             r["incremental_requests_per_project"] == 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--projects", type=int, default=50)
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--page-size", type=int, default=1000)
    parser.add_argument("--provider-concurrency", type=int, default=3)
    parser.add_argument("--provider-rate", type=float, default=5.0)
    parser.add_argument("--uri", default=None)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--save", default=None)
    parser.add_argument("--timeline", action="store_true",
                        help="keep every request of the full sweep (account, route, arrival) "
                             "in the JSON, to see where a pass waited")
    parser.add_argument("--store-child", type=int, nargs=2, default=None,
                        help=argparse.SUPPRESS)  # files, projects: see store_mb
    args = parser.parse_args()
    if args.store_child:
        store_child(*args.store_child)
        return
    benchlib.quiet_logging()
    os.environ.pop("MONGODB_URI", None)
    result = asyncio.run(run(args))
    result["targets"] = {name: ok for name, ok in verdicts(result)}
    if args.save:
        with open(args.save, "w") as out:
            json.dump(result, out, indent=2, default=str)
    if args.json:
        benchlib.emit(result)
        return
    for key, value in result.items():
        if key not in ("targets", "timeline"):
            print(f"{key:>34}  {benchlib.fmt(value)}")
    for name, ok in verdicts(result):
        print(f"{benchlib.verdict(ok)}  {name}")


if __name__ == "__main__":
    main()
