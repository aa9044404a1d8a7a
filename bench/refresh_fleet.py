"""Fleet benchmark: N integrations whose tokens expire over a few minutes, refreshed by
the daemon, beside a baseline doing the same with one APScheduler date job per
integration (as a Bull user would write it), in the same run.

What runs, once for each contender, each in a fresh process with its own token
endpoint and its own copy of the data:
- a real Authlib token endpoint (tests/support/oauth_server.py) in a child process
  on 127.0.0.1. It has ``--providers`` clients; even ones rotate refresh tokens
  (Microsoft-like: a used token is revoked, reusing it is ``invalid_grant``), odd ones
  never return one (Dropbox-like). Client secrets contain ``%``, ``+``, ``/``;
- N integrations seeded as the MWAP backend writes them (encrypted tokens, 24-hex
  string ids), integration i of provider i % P, its token expiring at
  ``seed + --offset + U(0, --spread)`` seconds, except ``--burst`` of them, which
  expire in the same instant, mid-spread (a mass reconnect an hour ago);
- **engine**: the whole daemon (`Daemon`, token refresh on, health checks off) on the
  store (embedded by default, ``--uri`` for a server). It discovers the integrations
  (its first full pass at start), schedules each refresh ``--lead`` s (+ up to
  ``--jitter``) before expiry and refreshes under the per-provider limits
  (``--provider-rate`` requests/s, ``--provider-concurrency`` in flight);
- **baseline**: the same job written the obvious way: an ``AsyncIOScheduler`` (fair
  settings: ``misfire_grace_time=None, coalesce=True``) with one ``date`` job per
  integration (``replace_existing``), added by a discovery loop on the same
  ``--sync-interval`` (a full pass at start and every tenth pass, else the
  integrations whose ``updatedAt`` moved); the job reads the integration, asks the
  token endpoint through the same per-provider limiter (`mwapjobs.ratelimit`), and
  writes the tokens back; the write-back moves ``updatedAt``, so discovery re-adds the
  job for the new expiry. Its job store is APScheduler's ``MongoDBJobStore`` on the
  same server with ``--uri``; on the embedded store ``MemoryJobStore`` by default
  (``--baseline-store mongo`` for a ``MongoDBJobStore`` on mongomock, which has no
  index for it: every add's wake-up scans the whole store, so it is not a fair
  comparison at thousands of jobs).

New tokens last an hour, so within the run every integration must be refreshed
exactly once.

Figures (``--json`` prints one object; the table prints engine / baseline ratios):
- refreshed_before_expiry, expired: integrations whose first successful refresh
  arrived at the endpoint before their token expired, and the others;
- duplicate_refreshes: token requests per integration per expiry period beyond the
  first, from the endpoint's log. Rotated tokens count as the same integration (the
  endpoint's answers are followed: a second refresh with a token that was already
  rotated is a duplicate too, and so is one that the endpoint refused);
- max_provider_rps: the most requests one provider received in any 1-second window
  (arrival times at the endpoint), against ``--provider-rate``;
- round trips per successful refresh, ``app`` (``Mongo.round_trips``) and
  ``scheduler`` (the APScheduler job store's; none for a ``MemoryJobStore``):
  ``*_round_trips_per_refresh`` in steady state, counted from the end of the first
  discovery pass to the end of the run: everything a refresh costs once the fleet is
  scheduled (claim, reads, token write-back, outcome, scheduling its successor for
  the new expiry, and the background loops), which is what the target is about;
  ``run_*_round_trips_per_refresh`` over the whole run, the first discovery pass
  included (which schedules every integration once more than the refreshes use:
  within one expiry period each integration is scheduled twice);
- max/p99 loop lag (a task sleeping 10 ms) over the run;
- details: discovery time, where the store's time went by call site
  (``db_busy_by_site_s``), lateness margins, statuses.

Targets (PASS/FAIL for the engine): 100 % refreshed before expiry, 0 duplicates,
max_provider_rps <= provider_rate + 1 (one request of jitter at a window's edge),
<= 4 application round trips per refresh.

Store-bound (``*``): discovery time, margins, and whether the fleet fits in time at
all on the embedded store: mongomock runs every query as Python code in this process.

Run from the repository root (a default run takes about five minutes):

    python bench/refresh_fleet.py                               # 2,000 integrations, 60 s spread
    python bench/refresh_fleet.py --integrations 10000 --spread 180   # the 10,000 target
    python bench/refresh_fleet.py --uri mongodb://127.0.0.1:27999 --integrations 2000
    python bench/refresh_fleet.py --only engine --json
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
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import benchlib
from benchlib import INTEGRATIONS, PROVIDERS, LagMonitor, Store, fmt, ratio, say, verdict

KEY = "0123456789abcdef0123456789abcdef"
PROGRESS_EVERY = 15.0
TARGET_TRIPS = 4.0


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
            log = []
            for r in list(server.requests):
                answer = r.response_json if isinstance(r.response_json, dict) else {}
                log.append([r.time, r.basic_auth[0] if r.basic_auth else None, r.status,
                            r.form.get("refresh_token"), answer.get("refresh_token"),
                            answer.get("expires_in")])
            print(json.dumps(log), flush=True)
    server.stop()


class TokenEndpoint:
    def __init__(self, clients: list[dict[str, Any]], tokens: list[tuple[str, str]]) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, __file__, "--serve-oauth"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=benchlib.ROOT,
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


# -- the fleet --------------------------------------------------------------------------------


class Fleet:
    """The seeded data of one run, and what the endpoint's log says about it."""

    def __init__(self, args: argparse.Namespace) -> None:
        from bson import ObjectId

        from mwapjobs.crypto import MwapCipher

        self.args = args
        n, p = args.integrations, args.providers
        rng = random.Random(args.seed)
        self.cipher = MwapCipher(KEY)
        self.clients = [{"id": f"bench-client-{k}", "secret": f"s3c%2F{k}+r/e",
                         "rotate": k % 2 == 0} for k in range(p)]
        self.tokens = [f"rt-bench-{i:06d}" for i in range(n)]
        self.seeded = datetime.now(UTC)
        self.expiry = [self.seeded + timedelta(seconds=args.offset + (
            args.spread / 2 if rng.random() < args.burst else rng.uniform(0, args.spread)))
            for _ in range(n)]
        now = self.seeded
        self.providers = [{
            "_id": ObjectId(), "name": f"Bench provider {k}", "slug": f"bench-{k}",
            "tokenUrl": "", "clientId": c["id"], "clientSecret": self.cipher.encrypt(c["secret"]),
            "grantType": "authorization_code", "metadata": {"providerType": "test"},
            "createdAt": now, "updatedAt": now} for k, c in enumerate(self.clients)]
        self.docs = [{
            "_id": str(ObjectId()), "tenantId": str(ObjectId()),
            "providerId": str(self.providers[i % p]["_id"]), "scopesGranted": ["files.read"],
            "status": "active", "connectedAt": now, "createdAt": now, "updatedAt": now,
            "createdBy": "auth0|bench", "metadata": {},
            "accessToken": self.cipher.encrypt(f"at-bench-{i}"),
            "refreshToken": self.cipher.encrypt(self.tokens[i]),
            "tokenExpiresAt": self.expiry[i]} for i in range(n)]
        self.ids = [d["_id"] for d in self.docs]

    async def seed(self, store: Store, token_url: str) -> float:
        for provider in self.providers:
            provider["tokenUrl"] = token_url
        t0 = time.perf_counter()
        await store.mongo.call(lambda db: db[PROVIDERS].insert_many(self.providers))
        for start in range(0, len(self.docs), 5000):
            chunk = self.docs[start:start + 5000]
            await store.mongo.call(lambda db, c=chunk: db[INTEGRATIONS].insert_many(c))
        return time.perf_counter() - t0

    def endpoint(self) -> TokenEndpoint:
        p = self.args.providers
        return TokenEndpoint(self.clients, [(self.clients[i % p]["id"], self.tokens[i])
                                            for i in range(self.args.integrations)])

    def analyse(self, log: list[list[Any]]) -> dict[str, Any]:
        """Requests per integration per expiry period, following rotated tokens."""
        owner = {token: i for i, token in enumerate(self.tokens)}
        expiries: dict[int, list[float]] = {i: [e.timestamp()] for i, e in
                                            enumerate(self.expiry)}
        periods: collections.Counter[tuple[int, int]] = collections.Counter()
        first_ok: dict[int, float] = {}
        arrivals: dict[str, list[float]] = collections.defaultdict(list)
        by_status: collections.Counter[str] = collections.Counter()
        unknown = 0
        for when, client, status, token, issued, expires_in in sorted(log, key=lambda r: r[0]):
            arrivals[client or "?"].append(when)
            by_status[str(status)] += 1
            i = owner.get(token or "")
            if i is None:
                unknown += 1
                continue
            period = bisect.bisect_right(sorted(expiries[i]), when)
            periods[(i, period)] += 1
            if status == 200:
                first_ok.setdefault(i, when)
                if issued:
                    owner[issued] = i
                expiries[i].append(when + float(expires_in or 3600))
        before = [i for i, w in first_ok.items() if w < self.expiry[i].timestamp()]
        margins = sorted(self.expiry[i].timestamp() - first_ok[i] for i in before)
        return {
            "refreshed_before_expiry": len(before),
            "expired": self.args.integrations - len(before),
            "refresh_requests": len(log),
            "duplicate_refreshes": sum(c - 1 for c in periods.values() if c > 1),
            "integrations_with_duplicates": sum(1 for c in periods.values() if c > 1),
            "requests_for_unknown_tokens": unknown,
            "max_provider_rps": max((max_in_window(t) for t in arrivals.values()), default=0),
            "responses_by_status": dict(by_status),
            "p50_margin_s": round(margins[len(margins) // 2], 1) if margins else None,
            "min_margin_s": round(margins[0], 1) if margins else None,
            "successful_refreshes": len(first_ok),
        }


def discovery_class() -> Any:
    """The daemon's discovery (refresh scheduling) class, wherever it lives now."""
    import importlib

    for module, name in (("mwapjobs.jobs.refresh.discovery", "RefreshSync"),
                         ("mwapjobs.jobs.refresh_sync", "RefreshSync")):
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise RuntimeError("cannot find the daemon's refresh discovery class")


def per_refresh(out: dict[str, Any], before: dict[str, int], steady: dict[str, int],
                after: dict[str, int]) -> dict[str, Any]:
    """Round trips per successful refresh: over the whole run, and in steady state (from
    the end of the first discovery pass: what each refresh costs once the fleet is
    scheduled, its successor's scheduling and the background loops included)."""
    refreshes = max(out["successful_refreshes"], 1)
    steady = steady or before
    app, sched = (after[k] - before[k] for k in ("app", "scheduler"))
    s_app, s_sched = (after[k] - steady[k] for k in ("app", "scheduler"))
    return {"app_round_trips": app, "scheduler_round_trips": sched,
            "run_app_round_trips_per_refresh": round(app / refreshes, 2),
            "run_scheduler_round_trips_per_refresh": round(sched / refreshes, 2),
            "app_round_trips_per_refresh": round(s_app / refreshes, 2),
            "scheduler_round_trips_per_refresh": round(s_sched / refreshes, 2),
            "round_trips_per_refresh": round((s_app + s_sched) / refreshes, 2),
            "first_pass_app_round_trips": steady["app"] - before["app"]}


def max_in_window(times: list[float], window: float = 1.0) -> int:
    """Most arrivals in any half-open window [t, t + window)."""
    times = sorted(times)
    best = 0
    for i, start in enumerate(times):
        best = max(best, bisect.bisect_left(times, start + window, lo=i) - i)
    return best


def time_calls(mongo: Any) -> tuple[collections.Counter[str], collections.Counter[str]]:
    """Time every `Mongo.call` by call site (module.function of the caller), from the
    caller's side: on the embedded store, the query's time on its thread plus the wait."""
    busy: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()
    original = mongo.call

    async def call(op: Any) -> Any:
        frame = sys._getframe(1)
        name = f"{frame.f_globals.get('__name__', '').rsplit('.', 1)[-1]}.{frame.f_code.co_name}"
        t0 = time.perf_counter()
        try:
            return await original(op)
        finally:
            busy[name] += time.perf_counter() - t0
            calls[name] += 1

    mongo.call = call
    return busy, calls


async def watch(fleet: Fleet, done: dict[str, float], lag: LagMonitor, store: Store,
                trips: Any) -> bool:
    """Wait until every integration was refreshed or the last expiry passed; True if the
    timeout cut it short."""
    args = fleet.args
    n = args.integrations
    last_expiry = max(fleet.expiry).timestamp()
    deadline = time.time() + args.timeout
    next_progress = time.time() + PROGRESS_EVERY
    while len(done) < n:
        now = time.time()
        if now > last_expiry + 5 or now > deadline:
            return now > deadline
        if now >= next_progress:
            next_progress = now + PROGRESS_EVERY
            overdue = sum(1 for i in range(n) if fleet.expiry[i].timestamp() <= now
                          and fleet.ids[i] not in done)
            say(f"refreshed {len(done)}/{n}, expired unrefreshed so far {overdue}, "
                f"round trips {trips()}, max lag {lag.summary()['max_loop_lag_ms']} ms")
        await asyncio.sleep(0.2)
    return False


# -- the engine ---------------------------------------------------------------------------------


async def engine_run(args: argparse.Namespace) -> dict[str, Any]:
    from mwapjobs.config import Settings
    from mwapjobs.daemon import Daemon

    fleet = Fleet(args)
    say(f"engine: starting the token endpoint with {args.providers} clients and "
        f"{args.integrations} refresh tokens")
    endpoint = fleet.endpoint()
    store = Store(args.uri, "fleet")
    try:
        seed_s = await fleet.seed(store, endpoint.token_url)
        busy, calls = time_calls(store.mongo)
        settings = Settings(
            mongodb_uri=store.settings_uri(), encryption_key=KEY, log_level="error",
            http={"host": "127.0.0.1", "port": 0}, health={"enabled": False},
            outbound={"allow_loopback": True},
            refresh={"lead": args.lead, "jitter": args.jitter,
                     "sync_interval": args.sync_interval, "request_timeout": 10,
                     "provider_concurrency": args.provider_concurrency,
                     "provider_rate": args.provider_rate},
        )
        daemon = Daemon(settings, mongo=store.mongo)
        done: dict[str, float] = {}
        failed: list[dict[str, Any]] = []

        def on_event(event: str, run: dict[str, Any]) -> None:
            iid = (run.get("data") or {}).get("integrationId")
            result = run.get("result")
            if event == "completed" and isinstance(result, dict) and "expiresAt" in result:
                done.setdefault(iid, time.time())
            elif event == "failed":
                failed.append({"integrationId": iid, "error": run.get("error")})

        daemon.engine.subscribe(on_event)
        lag = LagMonitor()
        lag.start()

        def trips() -> dict[str, int]:
            return {"app": store.mongo.round_trips,
                    "scheduler": daemon.engine.scheduler.round_trips}

        before = trips()
        steady: dict[str, int] = {}  # the counts once the first discovery pass is over
        passes: list[dict[str, Any]] = []
        discovery = discovery_class()
        original = discovery.sync_once

        async def timed_sync(self: Any, full: bool | None = None) -> Any:
            started = time.perf_counter()
            report = await original(self, full)
            passes.append({"s": round(time.perf_counter() - started, 3),
                           **{k: v for k, v in vars(report).items()
                              if isinstance(v, int | bool)}})
            if len(passes) == 1:
                steady.update(trips())
                say(f"engine: first discovery pass: {passes[0]}")
            return report

        discovery.sync_once = timed_sync
        await daemon.start()
        await daemon.wait_ready(120)
        timed_out = await watch(fleet, done, lag, store, trips)
        after = trips()
        result_lag = lag.summary()
        lag.stop()
        log = endpoint.dump()
        statuses = await store.mongo.call(lambda db: db[INTEGRATIONS].aggregate(
            [{"$group": {"_id": "$status", "n": {"$sum": 1}}}]).to_list(None))
        out = fleet.analyse(log)
        out.update(per_refresh(out, before, steady, after))
        out.update({
            "contender": "engine", "store": store.label,
            **result_lag,
            "timed_out": timed_out, "seed_s": round(seed_s, 1),
            "discovery_s": passes[0]["s"] if passes else None,
            "discovery_passes": len(passes),
            "failed_runs": len(failed), "failed_examples": failed[:3],
            "statuses": {str(s["_id"]): s["n"] for s in statuses},
            "db_busy_by_site_s": {k: round(v, 1) for k, v in busy.most_common(8)},
            "db_calls_by_site": dict(calls.most_common(8)),
            "peak_rss_mb": benchlib.peak_rss_mb(),
        })
        return out
    finally:
        endpoint.close()
        store.drop()


# -- the baseline: one APScheduler date job per integration ---------------------------------------

BASELINE: Any = None  # the job function is stored by reference: it finds its context here


async def baseline_refresh(integration_id: str) -> None:
    """The baseline's job: refresh one integration's token, write it back."""
    await BASELINE.refresh(integration_id)


class Baseline:
    def __init__(self, fleet: Fleet, store: Store, http: Any) -> None:
        from mwapjobs.ratelimit import KeyedLimiter

        args = fleet.args
        self.fleet, self.store, self.http, self.args = fleet, store, http, args
        self.limiter = KeyedLimiter(args.provider_concurrency, args.provider_rate)
        self.providers: dict[str, dict[str, Any]] = {}
        self.done: dict[str, float] = {}
        self.errors: collections.Counter[str] = collections.Counter()
        self.watermark: datetime | None = None
        self.passes: list[dict[str, Any]] = []
        self.scheduler: Any = None
        self.trips: Any = None
        self.steady: dict[str, int] = {}

    def start_scheduler(self) -> None:
        from apscheduler.jobstores.memory import MemoryJobStore
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        if self.args.baseline_store == "mongo":
            jobstore, self.trips = benchlib.aps_mongo_store(self.store, "aps_refresh_jobs")
        else:
            jobstore, self.trips = MemoryJobStore(), lambda: 0
        self.scheduler = AsyncIOScheduler(
            jobstores={"default": jobstore}, timezone=UTC,
            job_defaults={"misfire_grace_time": None, "coalesce": True, "max_instances": 1})
        self.scheduler.start()

    async def load_providers(self) -> None:
        docs = await self.store.mongo.call(lambda db: db[PROVIDERS].find({}).to_list(None))
        self.providers = {str(d["_id"]): d for d in docs}

    async def discover(self, full: bool) -> None:
        """Schedule (or move) one date job per integration."""
        started = time.perf_counter()
        query: dict[str, Any] = {} if full or self.watermark is None else \
            {"updatedAt": {"$gt": self.watermark}}
        docs = await self.store.mongo.call(lambda db: db[INTEGRATIONS].find(query).to_list(None))
        added = 0
        now = datetime.now(UTC)
        for i, doc in enumerate(docs):
            expires = doc.get("tokenExpiresAt")
            if doc.get("status") == "revoked" or not doc.get("refreshToken") or expires is None:
                continue
            expires = expires if expires.tzinfo else expires.replace(tzinfo=UTC)
            spread = (hash(doc["_id"]) % 1000) / 1000 * self.args.jitter
            due = max(now, expires - timedelta(seconds=self.args.lead + spread))
            job_id = f"refresh:{doc['_id']}"
            if full:
                existing = self.scheduler.get_job(job_id)
                if existing is not None and existing.next_run_time == due:
                    continue
            self.scheduler.add_job(baseline_refresh, "date", run_date=due, args=[doc["_id"]],
                                   id=job_id, replace_existing=True)
            added += 1
            if i % 200 == 199:
                await asyncio.sleep(0)
            stamp = doc.get("updatedAt")
            if isinstance(stamp, datetime):
                stamp = stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)
                self.watermark = max(self.watermark or stamp, stamp)
        self.passes.append({"s": round(time.perf_counter() - started, 3), "full": full,
                            "seen": len(docs), "added": added})
        if len(self.passes) == 1:
            self.steady = {"app": self.store.mongo.round_trips, "scheduler": self.trips()}
            say(f"baseline: first discovery pass: {self.passes[0]}")

    async def discover_forever(self) -> None:
        count = 0
        while True:
            try:
                await self.discover(full=count % 10 == 0)
            except Exception as exc:  # as the engine's discovery: log and go on
                say(f"baseline discovery failed: {type(exc).__name__}: {exc}")
            count += 1
            await asyncio.sleep(self.args.sync_interval)

    async def refresh(self, integration_id: str) -> None:
        import aiohttp

        mongo = self.store.mongo
        doc = await mongo.call(lambda db: db[INTEGRATIONS].find_one({"_id": integration_id}))
        if doc is None or not doc.get("refreshToken"):
            return
        provider = self.providers[str(doc["providerId"])]
        cipher = self.fleet.cipher
        refresh_token = cipher.decrypt(doc["refreshToken"])
        secret = cipher.decrypt(provider["clientSecret"])
        auth = aiohttp.BasicAuth(quote(provider["clientId"], safe=""), quote(secret, safe=""))
        try:
            async with self.limiter.slot(str(provider["_id"])), self.http.post(
                    provider["tokenUrl"], auth=auth,
                    data={"grant_type": "refresh_token", "refresh_token": refresh_token},
                    timeout=aiohttp.ClientTimeout(total=10)) as resp:
                body = await resp.json(content_type=None)
                status = resp.status
        except Exception as exc:
            self.errors[type(exc).__name__] += 1
            return
        if status != 200 or "access_token" not in body:
            self.errors[f"http {status} {body.get('error')}"] += 1
            return
        now = datetime.now(UTC)
        fields = {"accessToken": cipher.encrypt(body["access_token"]),
                  "tokenExpiresAt": now + timedelta(seconds=int(body.get("expires_in") or 3600)),
                  "updatedAt": now}
        if body.get("refresh_token"):
            fields["refreshToken"] = cipher.encrypt(body["refresh_token"])
        await mongo.call(lambda db: db[INTEGRATIONS].update_one(
            {"_id": integration_id, "refreshToken": doc["refreshToken"]}, {"$set": fields}))
        self.done.setdefault(integration_id, time.time())


async def baseline_run(args: argparse.Namespace) -> dict[str, Any]:
    global BASELINE
    import aiohttp

    fleet = Fleet(args)
    say("baseline: starting the token endpoint")
    endpoint = fleet.endpoint()
    store = Store(args.uri, "fleetbase")
    try:
        seed_s = await fleet.seed(store, endpoint.token_url)
        busy, calls = time_calls(store.mongo)
        async with aiohttp.ClientSession() as http:
            base = BASELINE = Baseline(fleet, store, http)
            lag = LagMonitor()
            lag.start()
            base.start_scheduler()

            def trips() -> dict[str, int]:
                return {"app": store.mongo.round_trips, "scheduler": base.trips()}

            before = trips()
            await base.load_providers()
            discovery = asyncio.ensure_future(base.discover_forever())
            timed_out = await watch(fleet, base.done, lag, store, trips)
            after = trips()
            discovery.cancel()
            result_lag = lag.summary()
            lag.stop()
            log = endpoint.dump()
        out = fleet.analyse(log)
        out.update(per_refresh(out, before, base.steady, after))
        out.update({
            "contender": "baseline",
            "store": store.label, "baseline_job_store":
                "MemoryJobStore" if args.baseline_store == "memory" else "MongoDBJobStore",
            **result_lag,
            "timed_out": timed_out, "seed_s": round(seed_s, 1),
            "discovery_s": base.passes[0]["s"] if base.passes else None,
            "discovery_passes": len(base.passes),
            "job_errors": dict(base.errors.most_common(5)),
            "db_busy_by_site_s": {k: round(v, 1) for k, v in busy.most_common(8)},
            "db_calls_by_site": dict(calls.most_common(8)),
            "peak_rss_mb": benchlib.peak_rss_mb(),
        })
        return out
    finally:
        endpoint.close()
        store.drop()


# -- the parent ----------------------------------------------------------------------

ROWS = ("refreshed_before_expiry", "expired", "duplicate_refreshes", "refresh_requests",
        "max_provider_rps", "app_round_trips_per_refresh", "scheduler_round_trips_per_refresh",
        "round_trips_per_refresh", "run_app_round_trips_per_refresh",
        "run_scheduler_round_trips_per_refresh", "max_loop_lag_ms", "p99_loop_lag_ms",
        "discovery_s", "p50_margin_s", "min_margin_s", "peak_rss_mb")
STORE_BOUND = {"discovery_s", "p50_margin_s", "min_margin_s"}


def check_targets(r: dict[str, Any], args: argparse.Namespace) -> list[tuple[str, bool, str]]:
    n = args.integrations
    return [
        ("100 % refreshed before expiry", r.get("refreshed_before_expiry") == n,
         f"{fmt(r.get('refreshed_before_expiry'))} of {n:,}"),
        ("0 duplicate refreshes (rotated tokens included)", r.get("duplicate_refreshes") == 0,
         fmt(r.get("duplicate_refreshes"))),
        (f"provider limit held (<= {args.provider_rate:g} + 1 requests/s)",
         (r.get("max_provider_rps") or 0) <= args.provider_rate + 1,
         f"max {fmt(r.get('max_provider_rps'))} requests/s"),
        (f"<= {TARGET_TRIPS:g} application round trips per refresh",
         (r.get("app_round_trips_per_refresh") or 99) <= TARGET_TRIPS,
         f"{fmt(r.get('app_round_trips_per_refresh'))} (+ "
         f"{fmt(r.get('scheduler_round_trips_per_refresh'))} scheduler)"),
    ]


def child_cmd(args: argparse.Namespace, which: str) -> list[str]:
    cmd = [sys.executable, __file__, "--child", which]
    for flag in ("integrations", "providers", "spread", "burst", "lead", "jitter", "offset",
                 "provider_rate", "provider_concurrency", "sync_interval", "timeout", "seed",
                 "baseline_store"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.uri:
        cmd += ["--uri", args.uri]
    return cmd


def table(report: dict[str, Any], args: argparse.Namespace) -> str:
    e, b = report.get("engine") or {}, report.get("baseline") or {}
    lines = [f"store: {report['store']}; load average at start {report['load_start']}, at end "
             f"{report['load_end']}; {args.integrations:,} integrations, {args.providers} "
             f"providers at {args.provider_rate:g} requests/s, expiries over {args.spread:g} s "
             f"({args.burst:.0%} in one instant), lead {args.lead:g} s",
             f"baseline: one APScheduler date job per integration, "
             f"{b.get('baseline_job_store', '-')} (* store-bound)", ""]
    head = f"{'metric':36s}{'engine':>14s}{'baseline':>14s}{'engine/baseline':>17s}"
    lines += [head, "-" * len(head)]
    for row in ROWS:
        star = "*" if row in STORE_BOUND else ""
        lines.append(f"{row + star:36s}{fmt(e.get(row)):>14s}{fmt(b.get(row)):>14s}"
                     f"{ratio(e.get(row), b.get(row)):>17s}")
    for name, r in (("engine", e), ("baseline", b)):
        if "error" in r:
            lines.append(f"  {name}: NOT MEASURED: {r['error']}")
        elif r.get("timed_out"):
            lines.append(f"  {name}: TIMED OUT (partial figures)")
    if e.get("db_busy_by_site_s"):
        lines.append(f"  engine: store time by call site (s): {e['db_busy_by_site_s']}")
    if b.get("job_errors"):
        lines.append(f"  baseline: failed refreshes: {b['job_errors']}")
    lines.append("")
    for what, ok, numbers in report.get("targets", []):
        lines.append(f"{verdict(ok)}  engine: {what}: {numbers}")
    if b and "error" not in b:
        for what, ok, numbers in check_targets(b, args):
            lines.append(f"      (baseline: {what}: {'yes' if ok else 'no'}, {numbers})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--integrations", type=int, default=2_000)
    parser.add_argument("--providers", type=int, default=4)
    parser.add_argument("--spread", type=float, default=60.0,
                        help="seconds over which the tokens expire (default 60)")
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
    parser.add_argument("--uri", help="run on this MongoDB-wire server (default: embedded)")
    parser.add_argument("--baseline-store", choices=("memory", "mongo"), default=None,
                        help="the baseline's job store (default: mongo with --uri, else memory)")
    parser.add_argument("--only", choices=("engine", "baseline"), help="run one contender")
    parser.add_argument("--save", help="also write the JSON result to this file")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve-oauth", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=("engine", "baseline"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_oauth:
        serve_oauth()
        return
    if args.offset is None:
        args.offset = args.lead + args.jitter + 20 + args.integrations / 200
    if args.timeout is None:
        args.timeout = args.offset + args.spread + 120
    if args.baseline_store is None:
        args.baseline_store = "mongo" if args.uri else "memory"
    if args.child:
        benchlib.quiet_logging()
        result = asyncio.run(engine_run(args) if args.child == "engine" else baseline_run(args))
        benchlib.emit(result)
        os._exit(0)  # skip the graceful shutdown: it only costs time here
    report: dict[str, Any] = {
        "store": "embedded (mongomock)" if not args.uri else
        f"wire server {benchlib.mask(args.uri)}",
        "load_start": benchlib.loadavg(), "command": " ".join(["python", *sys.argv]),
        "settings": {k: getattr(args, k) for k in ("integrations", "providers", "spread",
                                                   "burst", "lead", "jitter", "offset",
                                                   "provider_rate", "provider_concurrency",
                                                   "sync_interval", "baseline_store")},
    }
    for which in ("engine", "baseline"):
        if args.only in (None, which):
            report[which] = benchlib.run_child(child_cmd(args, which), f"fleet-{which}",
                                               args.timeout + 300)
    report["load_end"] = benchlib.loadavg()
    if "engine" in report:
        report["targets"] = check_targets(report["engine"], args)
    text = table(report, args)
    report["targets"] = [{"target": w, "pass": ok, "measured": m}
                         for w, ok, m in report.get("targets", [])]
    if args.save:
        with open(args.save, "w") as out:
            json.dump(report, out, default=str, indent=1)
    print(json.dumps(report, default=str) if args.json else text)


if __name__ == "__main__":
    main()
