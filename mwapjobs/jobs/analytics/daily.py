"""The `analytics` queue: one run a day (`analytics.cron`, default 23:55 in
`analytics.timezone`) writes the day's snapshots (snapshot.py) into
`mwapjobs_analytics_daily`. A run has two phases:

1. **Storage quota** (`analytics.quota`): every connected integration's quota is asked
   of its provider (quota.py), provider by provider in lanes, so a slow provider holds
   only its own; the readings go into our notes in batches (`QUOTA_BATCH` per write).
2. **Snapshots**: a dozen `$group` aggregations (store), assembled in a thread, written a
   thousand per round trip by `_id` (`tenant:<tenantId>:<day>`): a rerun of a day replaces
   that day's documents.

The day's refresh counts come from the engine's events as they happen (every instance
counts what it ran, and adds it to `mwapjobs_analytics_activity` every
`ACTIVITY_FLUSH` s), since finished runs are trimmed long before a day ends. Counts of
the last seconds before a process stops may be missing (at most one flush interval).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
from pymongo.errors import PyMongoError

from ...config import AnalyticsSettings, RefreshSettings
from ...crypto import MwapCipher
from ...engine import Engine
from ...outbound import UrlPolicy
from ...queues import Job, QueueRegistry
from ...ratelimit import KeyedLimiter
from ...storage.analytics import AnalyticsStore
from ...storage.integrations import IntegrationStore
from ...storage.mongo import StoreUnavailable
from ..providers import provider_kind
from ..refresh.metrics import refresh_outcome
from ..refresh.now import refresh_now
from ..refresh.runs import QUEUE as REFRESH_QUEUE
from .quota import Reading, fetch, quota_spec
from .snapshot import assemble

log = logging.getLogger(__name__)

QUEUE = "analytics"
JOB_ID = "daily"
QUOTA_BATCH = 500
FINAL_FLUSH_WAITS = (1.0, 4.0, 0.0)  # the last flush: tries, and the pause after each
ACTIVITY_FLUSH = 5.0
OUTCOME_NAMES = {"refreshed": "refreshed", "skipped": "skipped",
                 "transient_failure": "transientFailure",
                 "permanent_failure": "permanentFailure"}


def day_of(moment: datetime, timezone: str) -> str:
    return moment.astimezone(ZoneInfo(timezone)).date().isoformat()


class Activity:
    """Refresh outcomes per tenant and day, counted from the engine's events and added to
    the store every ACTIVITY_FLUSH s (one `$inc` per tenant and day touched)."""

    def __init__(self, store: AnalyticsStore, timezone: str,
                 clock: Callable[[], datetime]) -> None:
        self.store = store
        self.timezone = timezone
        self.clock = clock
        self.pending: dict[tuple[str, str], Counter[str]] = {}

    def on_event(self, event: str, run: dict[str, Any]) -> None:
        if run.get("queue") != REFRESH_QUEUE:
            return
        outcome = refresh_outcome(event, run)
        tenant = (run.get("data") or {}).get("tenantId")
        if outcome is None or not tenant:
            return
        key = (str(tenant), day_of(self.clock(), self.timezone))
        self.pending.setdefault(key, Counter())[OUTCOME_NAMES[outcome]] += 1

    async def flush(self) -> None:
        pending, self.pending = self.pending, {}
        try:
            await self.store.bump_activity({k: dict(v) for k, v in pending.items()})
        except BaseException:
            for key, counts in pending.items():  # kept for the next flush
                self.pending.setdefault(key, Counter()).update(counts)
            raise


@dataclass
class QuotaReport:
    integrations: int = 0
    by_state: Counter[str] = field(default_factory=Counter)
    refreshed: int = 0
    writes: int = 0
    write_failures: int = 0
    unsaved: int = 0
    interrupted: bool = False


class Analytics:
    """The job handler, its quota lanes and its activity counter."""

    def __init__(self, store: AnalyticsStore, integrations: IntegrationStore,
                 settings: AnalyticsSettings, engine: Engine, http: aiohttp.ClientSession,
                 clock: Callable[[], datetime], *, cipher: MwapCipher | None,
                 policy: UrlPolicy, shared: KeyedLimiter | None = None,
                 refresh: RefreshSettings | None = None,
                 user_agent: str = "MWAP-OAuth-Client/1.0",
                 round_trips: Callable[[], int] = lambda: 0) -> None:
        """`cipher` None: no quota (tokens cannot be read); `refresh` None: a 401 is final
        (token refresh is off here); `shared`: the limiter every job's requests share."""
        self.store = store
        self.integrations = integrations
        self.settings = settings
        self.engine = engine
        self.http = http
        self.clock = clock
        self.cipher = cipher
        self.policy = policy
        self.refresh = refresh
        self.user_agent = user_agent
        self.round_trips = round_trips
        self.limiter = KeyedLimiter(settings.quota_provider_concurrency,
                                    settings.quota_provider_rate, within=shared)
        self.activity = Activity(store, settings.timezone, clock)
        self.last: dict[str, Any] | None = None
        self._stopping = False

    def register(self, registry: QueueRegistry) -> None:
        registry.register(QUEUE, self, attempts=1, concurrency=1,
                          timeout=self.settings.run_timeout)

    def interrupt(self) -> None:
        """The daemon stops: no new quota request; the snapshot uses what was read."""
        self._stopping = True

    async def __call__(self, job: Job) -> dict[str, Any]:
        day = job.data.get("day")
        return await self.run(str(day) if day else None)

    async def run(self, day: str | None = None) -> dict[str, Any]:
        """The day's snapshots (`day`: YYYY-MM-DD, default today in analytics.timezone)."""
        started = time.monotonic()
        trips = self.round_trips()
        now = self.clock()
        day = day or day_of(now, self.settings.timezone)
        quota = QuotaReport()
        # This run's readings only: one of an integration deleted or disconnected since
        # an earlier run is no quota of the day (ms: what the store keeps of a date).
        since: datetime | None = None
        if self.settings.quota and self.cipher is not None:
            since = now.replace(microsecond=now.microsecond // 1000 * 1000)
            await self.collect_quota(quota)
        quota_seconds = time.monotonic() - started
        with contextlib.suppress(Exception):  # the counts so far belong in the snapshot
            await self.activity.flush()
        written = await self.snapshots(day, now, quota_since=since)
        report = {
            "day": day, "tenants": written["tenants"], "replaced": written["replaced"],
            "quota": {"integrations": quota.integrations, "byState": dict(quota.by_state),
                      "refreshed": quota.refreshed, "interrupted": quota.interrupted,
                      "writeFailures": quota.write_failures, "unsaved": quota.unsaved,
                      "seconds": round(quota_seconds, 3)} if self.settings.quota else None,
            "seconds": round(time.monotonic() - started, 3),
            "snapshotSeconds": written["seconds"],
            "roundTrips": self.round_trips() - trips,
        }
        self.last = {"finishedAt": self.clock(), **report}
        log.info("analytics snapshot written", extra=report)
        return report

    # -- 2. snapshots ---------------------------------------------------------------------

    async def snapshots(self, day: str, now: datetime, *,
                        quota_since: datetime | None = None) -> dict[str, Any]:
        """Write the day's snapshots; quota readings taken at `quota_since` or later go
        in (None: no quota was read, none goes in)."""
        started = time.monotonic()
        s = self.store
        tenant_ids = await s.tenant_ids()
        projects, members = await s.projects_by_tenant(), await s.members_by_tenant()
        integrations, health = await s.integrations_by_tenant(), await s.health_by_tenant()
        quota = [] if quota_since is None else await s.quota_by_tenant(quota_since)
        files, activity = await s.files_by_tenant(), await s.activity(day)
        providers = await self.integrations.providers_by_id()
        docs = await asyncio.to_thread(lambda: assemble(
            day=day, at=now, tenant_ids=tenant_ids, projects=projects, members=members,
            integrations=integrations, health=health, quota=quota, files=files,
            activity=activity, providers=providers))
        replaced = 0
        batch = self.settings.write_batch
        for start in range(0, len(docs), batch):
            replaced += await s.write_snapshots(docs[start:start + batch])
        return {"tenants": len(tenant_ids), "replaced": replaced,
                "seconds": round(time.monotonic() - started, 3)}

    # -- 1. storage quota --------------------------------------------------------------------

    async def collect_quota(self, report: QuotaReport) -> None:
        docs = await self.integrations.connected_integrations()
        providers = await self.integrations.providers_by_id()
        report.integrations = len(docs)
        lanes: dict[str, deque[dict[str, Any]]] = {}
        for doc in docs:
            lanes.setdefault(str(doc.get("providerId")), deque()).append(doc)
        slots = asyncio.Semaphore(self.settings.quota_concurrency)
        pending: list[tuple[str, dict[str, Any]]] = []
        threshold = QUOTA_BATCH  # readings pending before the next write is tried

        async def flush(force: bool = False) -> bool:
            """Write full batches (all with `force`). A write the store refuses keeps its
            readings for the next flush: an hour of quota requests is not lost, nor the
            day's snapshot, to one store blip. False: something is left unwritten."""
            nonlocal threshold
            while pending and (force or len(pending) >= threshold):
                batch, pending[:] = pending[:QUOTA_BATCH], pending[QUOTA_BATCH:]
                try:
                    await self.store.record_quota(batch)
                except (StoreUnavailable, PyMongoError) as exc:
                    pending[:0] = batch
                    report.write_failures += 1
                    threshold = len(pending) + QUOTA_BATCH  # not again at every reading
                    log.warning("analytics: quota readings not written yet",
                                extra={"readings": len(batch), "error": type(exc).__name__})
                    return False
                report.writes += 1
                threshold = QUOTA_BATCH
            return True

        async def lane(queue: deque[dict[str, Any]]) -> None:
            while queue and not self._stopping:
                doc = queue.popleft()
                reading, refreshed = await self._one(doc, providers, slots)
                report.by_state[reading.state] += 1
                report.refreshed += int(refreshed)
                pending.append((str(doc["_id"]), {
                    "state": reading.state, "used": reading.used,
                    "allocated": reading.allocated, "message": reading.message[:200],
                    "httpStatus": reading.http_status, "at": self.clock(),
                    "tenantId": doc.get("tenantId"), "providerId": str(doc.get("providerId"))}))
                await flush()

        try:
            async with asyncio.TaskGroup() as group:
                for queue in lanes.values():
                    for _ in range(min(self.settings.quota_provider_concurrency, len(queue))):
                        group.create_task(lane(queue))
        finally:
            for wait in FINAL_FLUSH_WAITS:
                if await flush(force=True):
                    break
                await asyncio.sleep(wait)
            else:
                report.unsaved = len(pending)  # the snapshots go on without them
        report.interrupted = self._stopping

    async def _one(self, doc: dict[str, Any], providers: dict[str, dict[str, Any]],
                   slots: asyncio.Semaphore) -> tuple[Reading, bool]:
        provider_id = str(doc.get("providerId"))
        provider = providers.get(provider_id)
        if provider is None:
            return Reading("unsupported", message=f"provider {provider_id} not found"), False
        kind = provider_kind(provider)
        spec = quota_spec(kind, provider.get("metadata") or {})
        if spec.url is None:
            return Reading("unsupported", message=f"no quota request for {kind}"), False
        refusal = self.policy.refusal(spec.url, kind)
        if refusal is not None:  # the access token is never sent there
            return Reading("refused", message=refusal[:200]), False
        reading = await self._ask(spec, doc, provider_id, slots)
        if reading.state != "unauthorized" or self.refresh is None or not doc.get(
                "refreshToken") or self._stopping:
            return reading, False
        added = await refresh_now(self.engine, doc, self.clock())
        await added.settled(self.refresh.wait_timeout)
        fresh = await self.integrations.get(str(doc["_id"]))
        if fresh is None or not fresh.get("accessToken") or \
                fresh.get("accessToken") == doc.get("accessToken"):
            return reading, False
        return await self._ask(spec, fresh, provider_id, slots), True

    async def _ask(self, spec: Any, doc: dict[str, Any], provider_id: str,
                   slots: asyncio.Semaphore) -> Reading:
        assert self.cipher is not None
        token = self.cipher.decrypt_lenient(str(doc.get("accessToken") or ""))
        async with slots, self.limiter.slot(provider_id):
            return await fetch(self.http, spec, token, timeout=self.settings.request_timeout,
                               user_agent=self.user_agent)
