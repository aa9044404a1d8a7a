"""Scale benchmark: the daemon with 100,000 integrations and 1,000,000 finished runs in
history, next to the same daemon at one tenth of the size, measured in the same run.

Per size (``--integrations`` N, ``--history`` H; the tenth is N/10 and H/10), in a fresh
process and a database of its own (dropped at the end):

- seeding, not through the engine: three providers, N active integrations (tokens
  expiring in 20 to 30 days), the N delayed ``token-refresh`` runs discovery would have
  written for them (same job ids, data and fingerprints, due before expiry), H finished
  ``token-refresh`` runs (one in ten failed) finishing one every ``--spacing`` seconds
  back from now (0.5 s: 1,000,000 runs are 5.8 days of history, and the alert window
  holds the same runs at both sizes), and the queue's finished counters as a running
  daemon keeps them. On a server the seeding is a subprocess sending ``insert_many``
  batches of 10,000 straight through pymongo, and the daemon's own indexes are built
  afterwards (``index_s``: faster than keeping them up while inserting); on the
  embedded store it is inserted in the process (mongomock lives there).
  ``--seed-budget`` seconds (default 300) caps the seeding; the sizes reached are
  printed, and the tenth is then a tenth of what was reached.
- the full daemon (`Daemon`): token refresh on (the discovery under test), health
  checks, maintenance, analytics and owner emails off, the token-refresh queue's
  retention off (the history must stay), background intervals long (the sweep,
  retention, the alert loop) so that the counted commands are the measured call's.

Figures, each next to the tenth's, with the ratio (full / tenth: 10x the data; a
figure that does not grow with history has a ratio near 1):

- ``stats``: `Operations.stats()`; ``runs_first``: the first page of completed runs
  (`Operations.list_runs`, 20); ``runs_failed``: the first page filtered to failed runs;
  ``runs_delayed``: the first page of the delayed runs; ``metrics``: ``GET /metrics``;
  ``alerts``: one `AlertManager.evaluate()` (every rule, the refresh job's included).
  For each: median and p90 ms of ``--repeat`` calls (after one warm-up), the
  application's round trips per call (`Mongo.round_trips`), and, on a server, the
  commands the drivers sent and, where the server explains them, each read command's
  plan (``find``/``count``/``aggregate``/``distinct`` replayed with ``explain``,
  executionStats: the winning plan's stages, keys and documents examined). The
  embedded store has no planner: it answers from the indexes in storage/embedded.py.
- ``discovery_full`` / ``discovery_incremental``: a full pass and an incremental pass
  over the N unchanged integrations (`RefreshSync.sync_once`): seconds, application
  round trips, wire commands by name (the getMore of a large read included), and what
  it changed (must be nothing).
- ``peak_rss_mb``: the daemon process's ``ru_maxrss`` after all of the above (the
  startup discovery pass over N integrations and N delayed runs included); target
  < 300 MB with 100,000 delayed runs. On the embedded store the data lives in the same
  process, so its RSS is the store's too (``rss_seeded_mb`` is after seeding, before
  the daemon).

Store-bound: the milliseconds are the store's time per query (mongomock's Python in a
thread of the daemon, or the wire server's); round trips and documents examined are
the portable figures.

    python bench/scale.py                                   # embedded, 100,000 / 1,000,000
    python bench/scale.py --uri mongodb://127.0.0.1:27999   # a server (as large as it bears)
    python bench/scale.py --integrations 10000 --history 100000 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import benchlib
from benchlib import CommandCounter, Store, emit, fmt, ms, percentile, ratio, say, verdict

KEY = "bench-encryption-key-0123456789ab"
QUEUE = "token-refresh"
KINDS = ("dropbox", "google", "microsoft")
BATCH = 10_000
READS = ("find", "count", "aggregate", "distinct")
FINISHED = ("completed", "failed")
OPS = ("stats", "runs_first", "runs_failed", "runs_delayed", "metrics", "alerts")
TARGETS = {"peak_rss_mb": 300.0, "growth": 2.0, "discovery_incremental_trips": 10}


# -- seeding ---------------------------------------------------------------------------


def seed_docs(kind: str, start: int, count: int, n_integrations: int, now: datetime,
              spacing: float, ids: list[Any], providers: list[Any]) -> list[dict[str, Any]]:
    """Documents `start` .. `start + count` of one kind: integrations, their delayed
    refresh runs, or finished runs (the ids of the integrations are shared)."""
    from bson import ObjectId

    from mwapjobs.config import RefreshSettings
    from mwapjobs.crypto import MwapCipher
    from mwapjobs.jobs.refresh.cycle import due_time
    from mwapjobs.jobs.refresh.runs import job_id, run_data
    from mwapjobs.storage.runs import dedupe_key

    token = _token(MwapCipher)
    settings = RefreshSettings()
    docs: list[dict[str, Any]] = []
    backoff = {"type": "exponential", "delay": 5.0, "jitter": 0.1, "max_delay": 3600.0}
    for i in range(start, start + count):
        iid = ids[i % n_integrations]
        integration = {"_id": iid, "tenantId": f"tenant-{i % max(1, n_integrations // 10)}",
                       "providerId": str(providers[i % len(providers)]), "status": "active",
                       "accessToken": token, "refreshToken": token,
                       "tokenExpiresAt": now + timedelta(days=20, seconds=(i * 7919) % 864_000),
                       "createdAt": now - timedelta(days=60),
                       # the backend's last writes spread over two months
                       "updatedAt": now - timedelta(hours=1, seconds=(i * 104_729) % 5_184_000)}
        if kind == "integrations":
            docs.append(integration)
        elif kind == "delayed":
            jid = job_id(str(iid))
            expires = integration["tokenExpiresAt"]
            docs.append({"_id": ObjectId(), "queue": QUEUE, "jobId": jid,
                         "data": run_data(integration), "state": "delayed", "priority": 0,
                         "runAt": due_time(str(iid), expires, settings), "attemptsMade": 0,
                         "maxAttempts": 3, "backoff": backoff, "timeout": 30.0,
                         "deadline": expires, "createdAt": now, "attempts": [],
                         "key": dedupe_key(QUEUE, jid)})
        else:
            finished = now - timedelta(seconds=(i + 1) * spacing)
            failed = i % 10 == 9
            outcome = "failed" if failed else "completed"
            docs.append({
                "_id": ObjectId(), "queue": QUEUE, "jobId": job_id(str(iid)),
                "data": run_data(integration), "state": outcome, "priority": 0,
                "runAt": finished - timedelta(seconds=1), "attemptsMade": 1, "maxAttempts": 3,
                "backoff": backoff, "timeout": 30.0, "deadline": None,
                "createdAt": finished - timedelta(seconds=2), "startedAt": finished,
                "finishedAt": finished, "durationMs": 120.0,
                "result": None if failed else {"outcome": "refreshed", "rotated": False},
                "error": {"message": "invalid_grant", "type": "TokenRefused",
                          "permanent": True} if failed else None,
                "attempts": [{"attempt": 1, "startedAt": finished, "finishedAt": finished,
                              "durationMs": 120.0, "outcome": outcome}],
            })
    return docs


_TOKEN: str | None = None


def _token(cipher_type: Any) -> str:
    """One ciphertext for every integration (decrypting any costs the same)."""
    global _TOKEN
    if _TOKEN is None:
        _TOKEN = cipher_type(KEY).encrypt("rt-bench")
    return _TOKEN


def seed_plan(n: int, h: int) -> list[tuple[str, str, int]]:
    from mwapjobs.storage.names import INTEGRATIONS, RUNS

    return [(INTEGRATIONS, "integrations", n), (RUNS, "delayed", n), (RUNS, "history", h)]


def seed(db: Any, n: int, h: int, spacing: float, budget: float,
         seed_value: int) -> dict[str, Any]:
    """Insert everything (pymongo or mongomock `db`), within `budget` seconds: the
    history is cut short when time runs out. Returns what was inserted."""
    from bson import ObjectId

    from mwapjobs.storage.names import PROVIDERS, QUEUES

    random.seed(seed_value)
    now = datetime.now(UTC)
    started = time.time()
    providers = [ObjectId() for _ in KINDS]
    db[PROVIDERS].insert_many([
        {"_id": p, "name": k.title(), "slug": k, "tokenUrl": "https://token.invalid/token",
         "clientId": "c", "clientSecret": "s", "createdAt": now, "updatedAt": now}
        for p, k in zip(providers, KINDS, strict=True)])
    ids = [ObjectId() for _ in range(n)]
    done = {"integrations": 0, "delayed": 0, "history": 0}
    for collection, kind, total in seed_plan(n, h):
        for start in range(0, total, BATCH):
            if kind == "history" and time.time() - started > budget:
                break
            docs = seed_docs(kind, start, min(BATCH, total - start), n, now, spacing, ids,
                             providers)
            db[collection].insert_many(docs, ordered=False)
            done[kind] += len(docs)
        say(f"seeded {done[kind]:,} {kind} ({time.time() - started:.0f} s)")
    completed = sum(1 for i in range(done["history"]) if i % 10 != 9)
    db[QUEUES].update_one({"_id": QUEUE}, {"$set": {"counts": {
        "completed": completed, "failed": done["history"] - completed}}}, upsert=True)
    return {**done, "seed_s": round(time.time() - started, 1)}


def seeder_main(args: argparse.Namespace) -> None:
    """The seeding subprocess (a server only): pymongo straight to the database."""
    import pymongo

    client = pymongo.MongoClient(args.uri, tz_aware=True, socketTimeoutMS=600_000)
    try:
        out = seed(client[args.db], args.integrations, args.history, args.spacing,
                   args.seed_budget, args.seed_value)
    finally:
        client.close()
    emit(out)


# -- counting and explaining ---------------------------------------------------------------


class Recorder(CommandCounter):
    """Counts every command by name and, while `capturing`, keeps the read commands."""

    def __init__(self) -> None:
        super().__init__()
        self.capturing = False
        self.captured: list[dict[str, Any]] = []

    def listener(self) -> Any:
        from pymongo import monitoring

        recorder = self

        class Listener(monitoring.CommandListener):
            def started(self, event: Any) -> None:
                with recorder._lock:
                    recorder.by_name[event.command_name] += 1
                    if recorder.capturing and event.command_name in READS:
                        recorder.captured.append(dict(event.command))

            def succeeded(self, event: Any) -> None:
                pass

            def failed(self, event: Any) -> None:
                pass

        return Listener()

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self.by_name)


class ScaleStore(Store):
    """benchlib's Store, with a Recorder as its wire counter."""

    def __init__(self, uri: str | None) -> None:
        self._recorder = Recorder()
        super().__init__(uri, "scale")
        if uri:
            self.wire = self._recorder

    def _connect(self) -> Any:
        if self.uri is not None:
            self.wire = self._recorder
        return super()._connect()


SKIP = {"lsid", "txnNumber", "autocommit", "readConcern", "writeConcern", "cursor"}


def explain_all(client: Any, db_name: str, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each read command of one call replayed with explain (executionStats)."""
    out = []
    for command in commands:
        body = {k: v for k, v in command.items() if not k.startswith("$") and k not in SKIP}
        name = next(iter(body))
        if name == "aggregate":
            body["cursor"] = {}
        text = json.dumps([body.get(k) for k in ("filter", "query", "pipeline")], default=str)
        entry: dict[str, Any] = {"command": name, "collection": body[name],
                                 "history": any(f'"state": "{s}"' in text for s in FINISHED)}
        try:
            plan = client[db_name].command({"explain": body, "verbosity": "executionStats"})
            entry.update(_plan_summary(plan))
        except Exception as exc:  # a server without explain, or without this one
            entry["explain"] = f"{type(exc).__name__}: {exc}"[:160]
        out.append(entry)
    return out


def _find_key(doc: Any, key: str) -> Any:
    if isinstance(doc, dict):
        if key in doc:
            return doc[key]
        for value in doc.values():
            found = _find_key(value, key)
            if found is not None:
                return found
    elif isinstance(doc, list):
        for value in doc:
            found = _find_key(value, key)
            if found is not None:
                return found
    return None


def _stages(plan: Any) -> str:
    parts = []
    while isinstance(plan, dict):
        stage = str(plan.get("stage", "?"))
        if plan.get("indexName"):
            stage += f"({plan['indexName']})"
        parts.append(stage)
        plan = plan.get("inputStage") or (plan.get("inputStages") or [None])[0]
    return "<".join(parts)


def _plan_summary(plan: dict[str, Any]) -> dict[str, Any]:
    stats = _find_key(plan, "executionStats") or {}
    return {"plan": _stages(_find_key(plan, "winningPlan")),
            "keys_examined": stats.get("totalKeysExamined"),
            "docs_examined": stats.get("totalDocsExamined"),
            "returned": stats.get("nReturned")}


# -- the daemon ---------------------------------------------------------------------------


def settings(store: Store) -> Any:
    from mwapjobs.config import Settings

    keep = {"count": None, "age": None}
    return Settings(
        mongodb_uri=store.settings_uri(), encryption_key=KEY, log_level="error",
        http={"host": "127.0.0.1", "port": 0},
        refresh={"enabled": True, "sync_interval": 3600.0},
        health={"enabled": False}, maintenance={"enabled": False},
        analytics={"enabled": False}, notifications={"enabled": False},
        engine={"sweep_interval": 3600.0, "retention_interval": 3600.0,
                "leader_lease": 600.0},
        alerts={"check_interval": 3600.0},
        queues={QUEUE: {"keep_completed": keep, "keep_failed": keep}})


async def measure(name: str, call: Callable[[], Awaitable[Any]], store: ScaleStore,
                  repeat: int) -> dict[str, Any]:
    """One warm-up call (its read commands captured, then explained), then `repeat`
    timed ones, each counted."""
    recorder = store._recorder
    recorder.captured, recorder.capturing = [], True
    await call()
    recorder.capturing = False
    times, counted = [], []
    for _ in range(repeat):
        trips0, wire0 = store.mongo.round_trips, recorder.snapshot()
        t0 = time.perf_counter()
        await call()
        times.append(time.perf_counter() - t0)
        counted.append((store.mongo.round_trips - trips0, dict(recorder.snapshot() - wire0)))
    # The background loops query too: the call with the fewest is the call's own count.
    trips, wire = min(counted, key=lambda c: (c[0], sum(c[1].values())))
    out: dict[str, Any] = {"median_ms": ms(percentile(times, 0.5)),
                           "p90_ms": ms(percentile(times, 0.9)), "round_trips": trips}
    if store.uri:
        out["wire"] = wire
        client = store.sync_client()
        try:
            out["explain"] = await asyncio.to_thread(explain_all, client, store.db_name,
                                                     recorder.captured)
        finally:
            client.close()
        for key, history in (("history_docs_examined", True), ("docs_examined", None)):
            known = [e.get("docs_examined") for e in out["explain"]
                     if history is None or e["history"] == history]
            out[key] = sum(k for k in known if isinstance(k, int)) \
                if any(isinstance(k, int) for k in known) else None
    say(f"{name}: {out['median_ms']} ms, {trips} round trips")
    return out


async def discovery_pass(discovery: Any, store: ScaleStore, full: bool) -> dict[str, Any]:
    recorder = store._recorder
    trips0, wire0 = store.mongo.round_trips, recorder.snapshot()
    t0 = time.perf_counter()
    report = await discovery.sync_once(full=full)
    seconds = time.perf_counter() - t0
    out = {"seconds": round(seconds, 2), "round_trips": store.mongo.round_trips - trips0,
           "seen": report.seen, "changed": report.added + report.moved + report.dropped
           + report.expired}
    if store.uri:
        wire = dict(recorder.snapshot() - wire0)
        out["wire"] = wire
        out["wire_commands"] = sum(wire.values())
    say(f"discovery ({'full' if full else 'incremental'}): {out}")
    return out


async def child_main(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    from mwapjobs.daemon import Daemon
    from mwapjobs.storage.integrations import IntegrationStore
    from mwapjobs.storage.runs import RunStore

    store = ScaleStore(args.uri)
    result: dict[str, Any] = {"store": store.label, "rss_start_mb": benchlib.rss_mb()}
    daemon: Daemon | None = None
    try:
        if args.uri:
            cmd = [sys.executable, __file__, "--seed", "--uri", args.uri, "--db",
                   store.db_name, *size_flags(args)]
            seeded = benchlib.run_child(cmd, f"scale-seed-{args.integrations}",
                                        args.seed_budget + 900)
            if "error" in seeded:
                return {**result, "error": f"seeding {seeded['error']}"}
        else:
            db = store.mongo.jobstore_client()[store.db_name]
            seeded = await asyncio.to_thread(seed, db, args.integrations, args.history,
                                             args.spacing, args.seed_budget, args.seed_value)
        t0 = time.time()  # the daemon's indexes, built after the seeding (faster so)
        await RunStore(store.mongo).ensure_indexes()
        await IntegrationStore(store.mongo).ensure_indexes()
        result.update(integrations=seeded["integrations"], delayed=seeded["delayed"],
                      history=seeded["history"], seed_s=seeded["seed_s"],
                      index_s=round(time.time() - t0, 1), rss_seeded_mb=benchlib.rss_mb())
        t0 = time.time()
        daemon = Daemon(settings(store), mongo=store.mongo)
        await daemon.start()
        await daemon.wait_ready(600)
        discovery = daemon.jobs["refresh"].discovery
        while discovery.last_sync is None or not daemon.engine.leadership.leading:  # noqa: ASYNC110
            await asyncio.sleep(0.05)  # the daemon's own first pass, started by its loop
        result["startup_s"] = round(time.time() - t0, 1)  # the first full pass included
        say(f"daemon ready, first discovery pass done in {result['startup_s']} s")
        result["discovery_full"] = await discovery_pass(discovery, store, True)
        result["discovery_incremental"] = await discovery_pass(discovery, store, False)
        ops = daemon.operations
        url = f"http://127.0.0.1:{daemon.port}/metrics"
        async with aiohttp.ClientSession() as http:
            async def scrape() -> None:
                async with http.get(url) as resp:
                    body = await resp.read()
                    assert resp.status == 200 and b"mwapjobs_queue_runs" in body, resp.status

            calls: dict[str, Callable[[], Awaitable[Any]]] = {
                "stats": ops.stats,
                "runs_first": lambda: ops.list_runs(QUEUE, "completed", 1, 20),
                "runs_failed": lambda: ops.list_runs(QUEUE, "failed", 1, 20),
                "runs_delayed": lambda: ops.list_runs(QUEUE, "delayed", 1, 20),
                "metrics": scrape,
                "alerts": daemon.alerts.evaluate,
            }
            for name, call in calls.items():
                result[name] = await measure(name, call, store, args.repeat)
        stats = (await ops.stats())[QUEUE]
        result["counts"] = stats
        result["counts_right"] = (stats["delayed"] == seeded["delayed"]
                                  and stats["completed"] + stats["failed"] == seeded["history"])
        result["rss_end_mb"] = benchlib.rss_mb()
        result["peak_rss_mb"] = benchlib.peak_rss_mb()
        return result
    finally:
        if daemon is not None:  # stopped first: its loops would write to the dropped database
            await daemon.stop()
        store.drop()


def size_flags(args: argparse.Namespace) -> list[str]:
    return ["--integrations", str(args.integrations), "--history", str(args.history),
            "--spacing", str(args.spacing), "--seed-budget", str(args.seed_budget),
            "--seed-value", str(args.seed_value), "--repeat", str(args.repeat)]


# -- the parent ---------------------------------------------------------------------------


def run_size(args: argparse.Namespace, n: int, h: int, label: str) -> dict[str, Any]:
    sized = argparse.Namespace(**{**vars(args), "integrations": n, "history": h})
    cmd = [sys.executable, __file__, "--child", *size_flags(sized)]
    if args.uri:
        cmd += ["--uri", args.uri]
    return benchlib.run_child(cmd, f"scale-{label}", args.seed_budget + 1800)


def num(d: dict[str, Any], *path: str) -> float | None:
    value: Any = d
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else None


def targets(report: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    full, tenth = report["full"], report["tenth"]
    out: list[tuple[str, bool | None, str]] = []
    if "error" in full or "error" in tenth:
        return [("measured", False, full.get("error") or tenth.get("error") or "")]
    for op in OPS:
        trips_f, trips_t = num(full, op, "round_trips"), num(tenth, op, "round_trips")
        docs_f = num(full, op, "history_docs_examined")
        docs_t = num(tenth, op, "history_docs_examined")
        shown = f"round trips {fmt(trips_t)} -> {fmt(trips_f)}"
        ok = trips_f is not None and trips_t is not None and trips_f <= trips_t + 1
        if docs_f is not None and docs_t is not None:
            shown += f", finished runs examined {fmt(docs_t)} -> {fmt(docs_f)}"
            ok = ok and docs_f <= TARGETS["growth"] * max(docs_t, 100)
        all_f, all_t = num(full, op, "docs_examined"), num(tenth, op, "docs_examined")
        if all_f is not None and all_t is not None:
            shown += f" (all documents examined {fmt(all_t)} -> {fmt(all_f)})"
        out.append((f"{op}: cost does not grow with history", ok, shown))
    rss = num(full, "peak_rss_mb")
    delayed = full.get("delayed")
    label = "" if report["uri"] else " (embedded: the store's data is in the process too)"
    out.append((f"peak RSS with {fmt(delayed)} delayed runs < {TARGETS['peak_rss_mb']:g} MB"
                f"{label}", (rss is not None and rss < TARGETS["peak_rss_mb"])
                if report["uri"] else None, f"{fmt(rss)} MB"))
    for kind in ("full", "incremental"):
        d = full.get(f"discovery_{kind}") or {}
        trips = d.get("round_trips")
        wire = d.get("wire_commands")
        out.append((f"discovery ({kind}) of {fmt(d.get('seen'))} unchanged integrations: "
                    f"a few queries, nothing changed",
                    isinstance(trips, int) and trips <= TARGETS["discovery_incremental_trips"]
                    and d.get("changed") == 0,
                    f"{fmt(trips)} round trips" + (f", {fmt(wire)} wire commands "
                                                   f"({d.get('wire')})" if wire else "")
                    + f", {fmt(d.get('changed'))} changed"))
    out.append(("counts right", bool(full.get("counts_right")) and bool(
        tenth.get("counts_right")), f"{full.get('counts')}"))
    return out


def table(report: dict[str, Any]) -> str:
    full, tenth = report["full"], report["tenth"]
    lines = [f"store: {report['store']}; load average at start {report['load_start']}, at "
             f"end {report['load_end']}; {os.cpu_count()} CPUs",
             "(* store-bound: the store's time per query; ratio = full / tenth, 10x the data)",
             ""]
    head = f"{'figure':34s}{'tenth':>14s}{'full':>14s}{'ratio':>10s}"
    lines += [head, "-" * len(head)]

    def row(label: str, a: Any, b: Any, star: bool = False) -> None:
        lines.append(f"{label + ('*' if star else ''):34s}{fmt(a):>14s}{fmt(b):>14s}"
                     f"{ratio(b, a):>10s}")

    for key in ("integrations", "delayed", "history", "seed_s", "index_s", "startup_s"):
        row(key, tenth.get(key), full.get(key), key.endswith("_s"))
    for op in OPS:
        row(f"{op} median ms", num(tenth, op, "median_ms"), num(full, op, "median_ms"), True)
        row(f"{op} round trips", num(tenth, op, "round_trips"), num(full, op, "round_trips"))
        if num(full, op, "docs_examined") is not None:
            row(f"{op} docs examined", num(tenth, op, "docs_examined"),
                num(full, op, "docs_examined"))
            row(f"{op}   of them finished runs", num(tenth, op, "history_docs_examined"),
                num(full, op, "history_docs_examined"))
    for kind in ("full", "incremental"):
        key = f"discovery_{kind}"
        row(f"discovery {kind} s", num(tenth, key, "seconds"), num(full, key, "seconds"), True)
        row(f"discovery {kind} round trips", num(tenth, key, "round_trips"),
            num(full, key, "round_trips"))
        if num(full, key, "wire_commands") is not None:
            row(f"discovery {kind} wire commands", num(tenth, key, "wire_commands"),
                num(full, key, "wire_commands"))
    for key in ("rss_start_mb", "rss_seeded_mb", "rss_end_mb", "peak_rss_mb"):
        row(key, tenth.get(key), full.get(key))
    for name, side in (("tenth", tenth), ("full", full)):
        if "error" in side:
            lines.append(f"  {name}: NOT MEASURED: {side['error']}")
    plans = [(op, e) for op in OPS for e in (full.get(op) or {}).get("explain", [])]
    if plans:
        lines += ["", "plans at full size (explain, executionStats):"]
        for op, e in plans:
            lines.append(f"  {op:13s}{e['command']} {e['collection']}"
                         f"{' (history)' if e.get('history') else ''}: " + (
                e["explain"] if "explain" in e else
                f"{e['plan']}, keys {fmt(e['keys_examined'])}, docs "
                f"{fmt(e['docs_examined'])}, returned {fmt(e['returned'])}"))
    elif report["uri"] is None:
        lines += ["", "plans: the embedded store has no planner (no explain)"]
    lines.append("")
    for what, ok, numbers in report["targets"]:
        lines.append(f"{verdict(ok)}  {what}: {numbers}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uri", help="run on this MongoDB-wire server (default: embedded)")
    parser.add_argument("--integrations", type=int, default=100_000)
    parser.add_argument("--history", type=int, default=1_000_000, help="finished runs")
    parser.add_argument("--spacing", type=float, default=0.5,
                        help="seconds between two finished runs in the history (0.5)")
    parser.add_argument("--seed-budget", type=float, default=300.0,
                        help="seconds the full size's seeding may take; the history is cut "
                             "short there (300)")
    parser.add_argument("--repeat", type=int, default=10, help="timed calls per figure (10)")
    parser.add_argument("--seed-value", type=int, default=7, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--save", help="also write the JSON report to this file")
    parser.add_argument("--render", help="print the table of a report saved with --save")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seed", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.render:
        report = json.loads(Path(args.render).read_text())
        report["targets"] = [(t["target"], t["pass"], t["measured"]) for t in report["targets"]]
        print(table(report))
        return
    if args.seed:
        seeder_main(args)
        return
    if args.child:
        benchlib.quiet_logging()
        emit(asyncio.run(child_main(args)))
        os._exit(0)
    started = time.time()
    report: dict[str, Any] = {
        "store": "embedded (mongomock)" if not args.uri else
        f"wire server {benchlib.mask(args.uri)}",
        "uri": benchlib.mask(args.uri) if args.uri else None,
        "load_start": benchlib.loadavg(), "command": " ".join(["python", *sys.argv]),
    }
    # The full size first: if its history was cut at the budget, the tenth is a tenth
    # of what was reached.
    report["full"] = run_size(args, args.integrations, args.history, "full")
    reached = report["full"].get("history", args.history)
    report["tenth"] = run_size(args, max(1, args.integrations // 10), max(1, reached // 10),
                               "tenth")
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
    try:
        main()
    except subprocess.TimeoutExpired as exc:  # pragma: no cover - a hung child
        say(f"timed out: {exc}")
        sys.exit(1)
