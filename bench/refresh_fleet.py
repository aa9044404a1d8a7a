"""Fleet benchmark: N integrations whose tokens expire over a few minutes.

What runs:
- a real Authlib token endpoint (tests/support/oauth_server.py) in a child
  process on 127.0.0.1, so its CPU and GIL do not share the daemon's. It has
  `--providers` clients; even ones rotate refresh tokens (Microsoft-like), odd
  ones never return one (Dropbox-like). Client secrets contain `%`, `+`, `/`;
- the whole daemon (`Daemon`) in this process on the embedded store
  (`Mongo.from_clients(mongomock.MongoClient())`, as with `MONGODB_URI=memory://`);
- N integrations seeded the way the MWAP backend writes them (encrypted
  tokens, 24-hex string ids), integration i belonging to provider i % P, its
  token expiring at `seed + --offset + U(0, --spread)` seconds.

The daemon discovers them (its first full pass at start), schedules each
refresh `--lead` seconds (plus up to `--jitter`) before expiry, and refreshes
under the per-provider limits (`--provider-rate` requests per second,
`--provider-concurrency` in flight). New tokens last an hour, so within the
run every integration should be refreshed exactly once.

Choices, so that 10,000 integrations fit in a few minutes:
- `--lead 30` instead of 5 minutes: the refresh happens 30-32 s before expiry,
  ample for queueing behind the provider limit, short enough that the spread
  of expiries (not the lead) sets the run time;
- `--spread 180` with 4 providers at 20 requests/s: 10,000 refreshes over
  three minutes is ~56/s on average against 80/s allowed;
- `--burst 0.1`: a tenth of the tokens expire in the same instant (mid-spread),
  so the provider limit is exercised: 1,000 refreshes at 80/s take 12.5 s, well
  inside the 30 s lead (100 at 1,000 integrations: 1.3 s);
- `--offset` (default lead + jitter + 20 s + an allowance for discovery that
  grows with N) leaves the first discovery pass time to finish before the
  first refresh falls due; `discovery_s` is reported, and refreshes due before
  it ended are counted in `due_before_discovery`.

Output (`--json`): integrations, refreshed_before_expiry, expired (tokens that
reached their expiry without a successful refresh), refresh_requests (requests
the token endpoint received), duplicate_refreshes (requests beyond the first
per integration), max_provider_rps (most requests one provider received in
any 1-second window, from the server's arrival times), max_loop_lag_ms (a task
sleeping 10 ms on the daemon's loop, how late it woke) -- plus details:
where the embedded store's time went (`db_busy_s` by call site, measured on
its thread), discovery passes, round trips, lateness of refreshes.

Targets: every token refreshed before it expires, zero duplicates,
max_provider_rps <= provider_rate (+1 tolerated: one request of network
jitter at a window's edge).

Run from the repository root with the project's venv:

    python bench/refresh_fleet.py --integrations 1000
    python bench/refresh_fleet.py --integrations 10000 --json

mongomock scans the whole collection for every query (no indexes), and the
daemon's per-refresh queries (read the integration, save it, claim and finish
the run) each touch an N-sized collection, so the embedded store's thread is
the bottleneck at large N; the `db_busy_s` breakdown shows it. `--timeout`
bounds the run; whatever happened by then is reported (`timed_out`).

Measured on a shared 2-core VM (defaults, spread 180 s; see the helper's report):
- 1,000: all refreshed before expiry (median 28-31 s early), 0 duplicates,
  max 16-21 requests/s per provider (limit 20), loop lag 62-87 ms when the
  machine was otherwise idle; discovery 3.8 s; the store's thread ~20-45% busy;
- 3,000: 1,925 refreshed in time; the store's thread 89% busy (~13 refreshes/s);
- 10,000: 151 refreshed in time, 0 duplicates, rate respected; the first
  discovery pass was still writing runs after 5 minutes. The store's thread
  was busy 258 s of 287: reading one integration (64 ms, a scan of 10,000
  documents), promoting due runs (330 ms), claiming (100 ms), inserting runs.
  The embedded store is the limit, not the daemon's loop (lag stayed < 65 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, TypeVar

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

T = TypeVar("T")
KEY = "0123456789abcdef0123456789abcdef"
LAG_INTERVAL = 0.01
PROGRESS_EVERY = 10.0


# -- the token endpoint, in a child process ------------------------------------------------


def serve_oauth() -> None:
    """Child: read the clients and tokens (one JSON line), print the token URL, then answer
    "dump" with the request log (one JSON line), and exit when stdin closes."""
    from tests.support.oauth_server import OAuthServer

    config = json.loads(sys.stdin.readline())
    server = OAuthServer()
    server.start()
    for client in config["clients"]:
        server.add_client(client["id"], client["secret"], rotate_refresh_token=client["rotate"],
                          return_refresh_token=client["rotate"], expires_in=3600)
    for client_id, token in config["tokens"]:
        server.issue_refresh_token(client_id, refresh_token=token)
    print(json.dumps({"token_url": server.token_url}), flush=True)
    for line in sys.stdin:
        if line.strip() == "dump":
            log = [[r.time, r.basic_auth[0] if r.basic_auth else None, r.status,
                    r.form.get("refresh_token")] for r in list(server.requests)]
            print(json.dumps(log), flush=True)
    server.stop()


class TokenEndpoint:
    def __init__(self, clients: list[dict[str, Any]], tokens: list[tuple[str, str]]) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, __file__, "--serve-oauth"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps({"clients": clients, "tokens": tokens}) + "\n")
        self._proc.stdin.flush()
        self.token_url: str = json.loads(self._proc.stdout.readline())["token_url"]

    def dump(self) -> list[list[Any]]:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write("dump\n")
        self._proc.stdin.flush()
        return list(json.loads(self._proc.stdout.readline()))

    def close(self) -> None:
        if self._proc.stdin:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()


# -- measuring -------------------------------------------------------------------------------


class LagMonitor:
    def __init__(self) -> None:
        self.max_lag = 0.0
        self.samples = 0
        self.last = time.perf_counter()
        self.big: list[tuple[float, float]] = []  # (seconds since start, lag) above 100 ms
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.last = self.began = time.perf_counter()
        self._task = asyncio.ensure_future(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(LAG_INTERVAL)
            now = time.perf_counter()
            lag = now - self.last - LAG_INTERVAL
            self.max_lag = max(self.max_lag, lag)
            if lag > 0.1:
                self.big.append((round(self.last - self.began, 1), round(lag * 1000)))
            self.samples += 1
            self.last = now


class StallSampler(threading.Thread):
    """--profile: while the loop is stalled (no tick for 50 ms), sample the loop thread's
    stack every 5 ms; the report counts samples (x 5 ms) by the innermost frames."""

    def __init__(self, lag: LagMonitor) -> None:
        super().__init__(daemon=True, name="stall-sampler")
        self.lag = lag
        self.loop_thread = threading.get_ident()
        self.stacks: collections.Counter[str] = collections.Counter()
        self.stopped = False

    def run(self) -> None:
        import traceback

        while not self.stopped:
            time.sleep(0.005)
            if time.perf_counter() - self.lag.last < LAG_INTERVAL + 0.05:
                continue
            frame = sys._current_frames().get(self.loop_thread)
            if frame is None:
                continue
            summary = traceback.extract_stack(frame)[-6:]
            key = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}"
                              for f in reversed(summary))
            self.stacks[key] += 1

    def report(self) -> list[tuple[str, int]]:
        return self.stacks.most_common(6)


def make_timed_mongo() -> Any:
    """The embedded store, timing every query on its own thread by call site."""
    import mongomock

    from mwapjobs.storage.mongo import Mongo

    class TimedMongo(Mongo):
        busy: ClassVar[collections.Counter[str]] = collections.Counter()
        calls: ClassVar[collections.Counter[str]] = collections.Counter()
        lock: ClassVar[threading.Lock] = threading.Lock()

        async def call(self, op: Callable[[Any], Awaitable[T]]) -> T:
            frame = sys._getframe(1)
            site = frame.f_code.co_name
            if site in ("_create_index",):
                site = frame.f_back.f_code.co_name if frame.f_back else site
            owner = frame.f_globals.get("__name__", "").rsplit(".", 1)[-1]
            name = f"{owner}.{site}"

            async def timed(db: Any) -> T:
                t0 = time.perf_counter()
                try:
                    return await op(db)
                finally:
                    with self.lock:
                        self.busy[name] += time.perf_counter() - t0
                        self.calls[name] += 1

            return await super().call(timed)

    return TimedMongo.from_clients(mongomock.MongoClient(tz_aware=True))


def max_in_window(times: list[float], window: float = 1.0) -> int:
    """Most arrivals in any half-open window [t, t + window)."""
    times = sorted(times)
    best = 0
    for i, start in enumerate(times):
        best = max(best, bisect.bisect_left(times, start + window, lo=i) - i)
    return best


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the run ----------------------------------------------------------------------------------


async def fleet(args: argparse.Namespace) -> dict[str, Any]:
    from mwapjobs.config import Settings
    from mwapjobs.crypto import MwapCipher
    from mwapjobs.daemon import Daemon
    from tests.support.mwap_data import (
        insert_integrations,
        insert_provider,
        integration_doc,
        new_hex_id,
    )

    n, p = args.integrations, args.providers
    rng = random.Random(args.seed)
    cipher = MwapCipher(KEY)
    clients = [{"id": f"bench-client-{k}", "secret": f"s3c%2F{k}+r/e", "rotate": k % 2 == 0}
               for k in range(p)]
    tokens = [f"rt-bench-{i:06d}" for i in range(n)]
    say(f"starting the token endpoint with {p} clients and {n} refresh tokens")
    endpoint = TokenEndpoint(clients, [(clients[i % p]["id"], tokens[i]) for i in range(n)])

    settings = Settings(
        mongodb_uri="memory://", encryption_key=KEY, log_level="warning",
        http={"host": "127.0.0.1", "port": 0},
        refresh={"lead": args.lead, "jitter": args.jitter, "sync_interval": args.sync_interval,
                 "request_timeout": 10, "provider_concurrency": args.provider_concurrency,
                 "provider_rate": args.provider_rate},
    )
    mongo = make_timed_mongo()
    providers = [await insert_provider(mongo, cipher, token_url=endpoint.token_url,
                                       client_id=c["id"], client_secret=c["secret"])
                 for c in clients]
    seeded = datetime.now(UTC)
    # `--burst` of them expire in the same instant (say, a mass reconnect an hour ago),
    # the rest uniformly over the spread
    expiry = [seeded + timedelta(seconds=args.offset + (
        args.spread / 2 if rng.random() < args.burst else rng.uniform(0, args.spread)))
        for _ in range(n)]
    docs = [integration_doc(cipher, provider=providers[i % p], tenant_id=new_hex_id(),
                            refresh_token=tokens[i], access_token=f"at-bench-{i}",
                            token_expires_at=expiry[i], now=seeded)
            for i in range(n)]
    ids = [str(d["_id"]) for d in docs]
    index_of = {token: i for i, token in enumerate(tokens)}
    t0 = time.perf_counter()
    await insert_integrations(mongo, docs)
    seed_s = time.perf_counter() - t0
    say(f"seeded {n} integrations in {seed_s:.1f}s; expiries from +{args.offset:.0f}s "
        f"to +{args.offset + args.spread:.0f}s")

    daemon = Daemon(settings, mongo=mongo)
    refreshed: dict[str, float] = {}   # integrationId -> when its run completed
    failed_runs: list[dict[str, Any]] = []

    def on_event(event: str, run: dict[str, Any]) -> None:
        iid = (run.get("data") or {}).get("integrationId")
        result = run.get("result")
        if event == "completed" and isinstance(result, dict) and "expiresAt" in result:
            refreshed.setdefault(iid, time.time())
        elif event == "failed":
            failed_runs.append({"integrationId": iid, "error": run.get("error")})

    daemon.engine.subscribe(on_event)
    # time spent awaiting APScheduler triggers (its MongoDBJobStore, on its own threads)
    scheduler = daemon.engine.scheduler
    aps_wait = {"s": 0.0, "calls": 0}
    trigger_method = "wake_at" if hasattr(scheduler, "wake_at") else "add_delayed"
    original_trigger = getattr(scheduler, trigger_method)

    async def timed_trigger(*args: Any) -> None:
        started = time.perf_counter()
        try:
            await original_trigger(*args)
        finally:
            aps_wait["s"] += time.perf_counter() - started
            aps_wait["calls"] += 1

    setattr(scheduler, trigger_method, timed_trigger)
    lag = LagMonitor()
    await daemon.start()
    sync = daemon.refresh_sync
    assert sync is not None, "refresh is disabled?"
    passes: list[dict[str, Any]] = []
    original_sync = sync.sync_once

    discovered_at: list[float] = []

    async def timed_sync(full: bool | None = None) -> Any:
        started = time.perf_counter()
        report = await original_sync(full)
        passes.append({**vars(report), "s": round(time.perf_counter() - started, 3),
                       "at": round(time.time() - seeded.timestamp(), 1)})
        if len(passes) == 1:
            discovered_at.append(time.time())
            say(f"first discovery pass: {passes[0]}")
        return report

    sync.sync_once = timed_sync  # type: ignore[method-assign]
    lag.start()
    sampler = StallSampler(lag) if args.profile else None
    if sampler:
        sampler.start()
    await daemon.wait_ready()

    last_expiry = max(expiry).timestamp()
    deadline = time.time() + args.timeout
    next_progress = time.time() + PROGRESS_EVERY
    timed_out = False
    while len(refreshed) < n:
        now = time.time()
        if args.discovery_only and passes:
            break
        if now > last_expiry + 5 or now > deadline:
            timed_out = now > deadline
            break
        if now >= next_progress:
            next_progress = now + PROGRESS_EVERY
            overdue = sum(1 for i in range(n) if expiry[i].timestamp() <= now
                          and ids[i] not in refreshed)
            say(f"refreshed {len(refreshed)}/{n}, expired unrefreshed so far {overdue}, "
                f"requests {daemon.refresher.requests if daemon.refresher else 0}, "
                f"active runs {daemon.engine.active_count}, round trips {mongo.round_trips}, "
                f"max lag {lag.max_lag * 1000:.0f} ms")
        await asyncio.sleep(0.2)
    ended = time.time()
    lag.stop()  # what follows (reading the server's log) blocks this loop on purpose
    if sampler:
        sampler.stopped = True

    log = endpoint.dump()
    statuses = await mongo.call(lambda db: db["cloudProviderIntegrations"].aggregate(
        [{"$group": {"_id": "$status", "n": {"$sum": 1}}}]).to_list(None))
    endpoint.close()

    per_integration: collections.Counter[int] = collections.Counter()
    first_ok: dict[int, float] = {}
    arrivals: dict[str, list[float]] = collections.defaultdict(list)
    by_status: collections.Counter[str] = collections.Counter()
    for when, client, status, token in log:
        arrivals[client or "?"].append(when)
        by_status[str(status)] += 1
        i = index_of.get(token or "")
        if i is None:
            continue
        per_integration[i] += 1
        if status == 200:
            first_ok.setdefault(i, when)
    before = [i for i, when in first_ok.items() if when < expiry[i].timestamp()]
    margins = [expiry[i].timestamp() - first_ok[i] for i in before]
    discovered = discovered_at[0] if discovered_at else None
    due_before_discovery = sum(
        1 for i in range(n)
        if discovered is None or expiry[i].timestamp() - args.lead - args.jitter < discovered)
    runs_written = await mongo.call(
        lambda db: db["mwapjobs_runs"].count_documents({"queue": "token-refresh"}))
    result: dict[str, Any] = {
        "integrations": n,
        "refreshed_before_expiry": len(before),
        "expired": n - len(before),
        "refresh_requests": len(log),
        "duplicate_refreshes": sum(c - 1 for c in per_integration.values() if c > 1),
        "max_provider_rps": max((max_in_window(t) for t in arrivals.values()), default=0),
        "max_loop_lag_ms": round(lag.max_lag * 1000, 1),
        # details
        "provider_rate": args.provider_rate,
        "providers": p,
        "lead_s": args.lead,
        "spread_s": args.spread,
        "burst": args.burst,
        "offset_s": args.offset,
        "timed_out": timed_out,
        "run_s": round(ended - seeded.timestamp(), 1),
        "seed_s": round(seed_s, 1),
        "discovery_s": passes[0]["s"] if passes else None,
        "discovery_finished": bool(passes),
        "due_before_discovery": due_before_discovery,
        "refresh_runs_written": runs_written,
        "discovery_passes": len(passes),
        "max_pass_s": max((x["s"] for x in passes), default=None),
        "responses_by_status": dict(by_status),
        "failed_runs": len(failed_runs),
        "failed_examples": failed_runs[:3],
        "statuses": {str(s["_id"]): s["n"] for s in statuses},
        "p50_margin_s": round(pct(margins, 0.5) or 0, 1),
        "min_margin_s": round(min(margins), 1) if margins else None,
        "db_round_trips": mongo.round_trips,
        "db_round_trips_per_refresh": round(mongo.round_trips / max(len(first_ok), 1), 1),
        "db_busy_s": round(sum(mongo.busy.values()), 1),
        "db_busy_by_site_s": {k: round(v, 1) for k, v in mongo.busy.most_common(8)},
        "db_ms_per_call": {k: round(mongo.busy[k] / mongo.calls[k] * 1000, 2)
                           for k, _ in mongo.busy.most_common(8)},
        "scheduler_round_trips": daemon.engine.scheduler.round_trips,
        "scheduler_add_trigger_wait_s": round(aps_wait["s"], 1),
        "scheduler_add_trigger_ms_per_call": round(
            aps_wait["s"] / max(aps_wait["calls"], 1) * 1000, 2),
    }
    result["stalls_over_100ms"] = lag.big[:20]
    if args.verbose_passes:
        result["passes"] = passes
    if sampler:
        result["stall_samples"] = sampler.report()
    return result


def check_targets(result: dict[str, Any], rate: float) -> dict[str, bool]:
    return {
        "all_refreshed_before_expiry": result["refreshed_before_expiry"] == result["integrations"],
        "no_duplicates": result["duplicate_refreshes"] == 0,
        "provider_rate_respected": result["max_provider_rps"] <= rate + 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--integrations", type=int, default=10_000)
    parser.add_argument("--providers", type=int, default=4)
    parser.add_argument("--spread", type=float, default=180.0,
                        help="seconds over which the tokens expire (default 180)")
    parser.add_argument("--burst", type=float, default=0.1,
                        help="fraction of tokens expiring in the same instant, mid-spread "
                             "(default 0.1)")
    parser.add_argument("--lead", type=float, default=30.0,
                        help="refresh.lead: seconds before expiry (default 30)")
    parser.add_argument("--jitter", type=float, default=2.0, help="refresh.jitter (default 2)")
    parser.add_argument("--offset", type=float, default=None,
                        help="seconds from seeding to the first expiry "
                             "(default lead + jitter + 20 + N/200)")
    parser.add_argument("--provider-rate", type=float, default=20.0)
    parser.add_argument("--provider-concurrency", type=int, default=4)
    parser.add_argument("--sync-interval", type=float, default=10.0,
                        help="refresh.sync_interval (default 10)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="give up this many seconds after seeding "
                             "(default offset + spread + 120)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--verbose-passes", action="store_true",
                        help="include every discovery pass in the output")
    parser.add_argument("--discovery-only", action="store_true",
                        help="stop after the first discovery pass (use a large --offset so "
                             "that nothing is due: it times discovery alone)")
    parser.add_argument("--profile", action="store_true",
                        help="sample the loop thread's stack while the loop is stalled")
    parser.add_argument("--serve-oauth", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_oauth:
        serve_oauth()
        return
    if args.offset is None:
        args.offset = args.lead + args.jitter + 20 + args.integrations / 200
    if args.timeout is None:
        args.timeout = args.offset + args.spread + 120
    import logging

    logging.basicConfig(level=logging.ERROR)
    asyncio.run(run_and_report(args))


async def run_and_report(args: argparse.Namespace) -> None:
    result = await fleet(args)
    result["targets"] = check_targets(result, args.provider_rate)
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        width = max(len(k) for k in result)
        for key, value in result.items():
            print(f"{key:{width}s}  {value}")
    sys.stdout.flush()
    os._exit(0)  # skip the graceful shutdown: on mongomock it only costs time here


if __name__ == "__main__":
    main()
