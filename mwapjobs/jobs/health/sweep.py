"""The `health-check` queue: is every connected integration still working?

A *sweep* is one run of this queue. It probes every connected integration (an
access token, not `revoked`) once (`probes.py` says how, per provider):

- **When.** A repeat (`health.cron` in `health.timezone`, default every 4 hours)
  adds a sweep run with job id `sweep`; a fire while the previous sweep is still
  pending or running adds nothing (the engine's job-id rule), so sweeps never
  overlap. `POST /api/v1/integrations/health/check` adds one now, without
  spreading; if a spread sweep is running in this process it is *hurried*
  instead: its remaining probes start at once.
- **Spreading.** With `health.spread`, each integration starts at a fixed point
  of the interval: `offset_fraction(id)` (a hash of its id, so the same
  integration is checked at the same point of every interval) times
  `SPREAD_FRACTION` of the time until the next fire. The last 20 % of the
  interval is left for stragglers, refreshes and re-probes.
- **Limits.** At most `health.concurrency` probes in flight, and per provider at
  most `health.provider_concurrency` with starts `1/health.provider_rate` s
  apart (`KeyedLimiter`). Each provider has its own lanes, so a slow or
  hanging provider holds only its own slots and never starves the others.
- **Reads and writes.** One query reads every integration to probe (with its
  encrypted tokens), one our notes, one the providers. A probe due more than
  `TOKEN_MAX_AGE` s after that read re-reads its integration first (a spread
  sweep runs for hours; tokens are refreshed meanwhile). Results are written
  in batches (`IntegrationStore.record_health`, see `_Writer`), every
  `FLUSH_DELAY` s or `FLUSH_MAX` results. Status changes and
  notifications are written one by one, at once, with the backend's
  conditional filter.

What a result does (see README, "Integration health"):
- success → `healthy`; an `expired` or `error` status that a health check set
  (recorded in our notes as `health.setStatus`) goes back to `active`;
- 401, or an access token past `tokenExpiresAt` → a high-priority run of the
  `token-refresh` queue, then a second probe with the new token. A permanent
  refusal of the refresh makes the integration `expired` (the refresher does it
  and notifies); no refresh token at all makes it `expired` here. When the
  provider is on hold (its own configuration is broken, see
  storage/providers.py), or the refresh is postponed because it just went on
  hold, the result is `skipped`: no status change and no counted failure;
- an explicit revocation code from the provider → `revoked` (never undone);
- 403 → `expired`, unless it is a rate or quota limit (then as 5xx);
- 5xx, 429, 3xx, other 4xx, a wrong body, timeouts, network errors → a failure:
  logged every time, and the status becomes `error` only at the
  `health.failure_threshold`-th failure in a row, so one hiccup does not flap
  thousands of statuses;
- a change to `expired` or `revoked` records a tenant-owner notification.
A `revoked` integration is never probed, refreshed or reactivated.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import aiohttp

from ..config import HealthSettings, RefreshSettings
from ..crypto import MwapCipher
from ..engine import Engine, as_utc
from ..operations import Operations
from ..outbound import UrlPolicy
from ..queues import Job, QueueRegistry
from ..ratelimit import KeyedLimiter
from ..scheduler import make_trigger
from ..storage.integrations import IntegrationStore
from . import probes
from .probes import ProbeResult, ProbeSpec
from .token_refresh import MANUAL_PRIORITY, fingerprint
from .token_refresh import QUEUE as REFRESH_QUEUE
from .token_refresh import job_id as refresh_job_id
from .token_refresh import run_data as refresh_run_data

log = logging.getLogger(__name__)

QUEUE = "health-check"
SWEEP_JOB_ID = "sweep"
SPREAD_FRACTION = 0.8
TOKEN_MAX_AGE = 60.0  # seconds a token read at the start of a sweep is used without re-reading
POSTPONE_POLL = 1.0  # seconds between looks at a refresh run that may have been postponed
# Results are written in batches, every FLUSH_DELAY s or FLUSH_MAX results, whichever
# comes first, while the probes go on. Each batch is cut into range updates of results
# dense in id order (RUN_GAP), at most MAX_RUN each.
FLUSH_MAX = 2000
FLUSH_DELAY = 5.0
RUN_GAP = 256  # a split costs a query (a scan on the embedded store); a gap, only those documents
MAX_RUN = 2000

Outcome = Literal["healthy", "failing", "error", "expired", "revoked", "skipped"]
OUTCOMES: tuple[Outcome, ...] = ("healthy", "failing", "error", "expired", "revoked", "skipped")
Finding = Literal["healthy", "failure", "expired", "refresh_refused", "revoked", "skipped"]


def offset_fraction(integration_id: str) -> float:
    """Where in a spread sweep this integration starts, in [0, 1): fixed per integration."""
    digest = hashlib.sha256(f"mwapjobs-health:{integration_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


@dataclass
class SweepReport:
    integrations: int = 0
    checked: int = 0
    healthy: int = 0
    failing: int = 0
    error: int = 0
    expired: int = 0
    revoked: int = 0
    skipped: int = 0
    refreshed: int = 0
    changed: int = 0  # status writes made
    writes: int = 0  # batched writes of the results
    window: float = 0.0
    hurried: bool = False
    interrupted: bool = False  # the daemon stopped: the rest waits for the next sweep
    seconds: float = 0.0
    read_seconds: float = 0.0  # reading the integrations and providers, before any probe
    write_seconds: float = 0.0  # in batched writes (they overlap the probing)

    def as_dict(self) -> dict[str, Any]:
        """The report as the run's result (JSON names: camelCase)."""
        return {_camel(k): v for k, v in asdict(self).items()}


@dataclass
class _Item:
    id: str
    doc: dict[str, Any]
    provider_key: str
    start: float
    read_at: float
    # From our notes (`_Sweep.states`, read while the first probes run):
    noted: bool = False
    failures: int = 0
    set_status: str | None = None
    dead_refresh: str | None = None
    last_healthy: datetime | None = None
    last_failure: datetime | None = None


@dataclass
class _Sweep:
    run_id: str | None
    window: float
    started_at: datetime
    t0: float
    providers: dict[str, dict[str, Any]]
    writer: _Writer
    report: SweepReport
    states: asyncio.Future[dict[str, dict[str, Any]]]
    hurry: asyncio.Event = field(default_factory=asyncio.Event)
    interrupted: bool = False
    planned: int = 0
    specs: dict[str, tuple[ProbeSpec, frozenset[str]]] = field(default_factory=dict)

    def spec(self, key: str, provider: dict[str, Any]) -> tuple[ProbeSpec, frozenset[str]]:
        """The probe of a provider and its revocation codes, worked out once per sweep."""
        known = self.specs.get(key)
        if known is None:
            spec = probes.probe_spec(provider)
            known = self.specs[key] = (spec, probes.revoked_errors(provider, spec.kind))
        return known

    async def note(self, item: _Item) -> None:
        """Fill in what our notes say about `item` (once the notes are read)."""
        if item.noted:
            return
        state = (await asyncio.shield(self.states)).get(item.id) or {}
        health = state.get("health") or {}
        item.failures = int(health.get("consecutiveFailures") or 0)
        item.set_status = health.get("setStatus")
        item.last_healthy = health.get("lastHealthyAt")
        item.last_failure = health.get("lastFailureAt")
        item.dead_refresh = (state.get("refreshFailure") or {}).get("token")
        item.noted = True

    async def wait_until(self, start: float) -> None:
        """Sleep until `start`, or less if the sweep is hurried or interrupted."""
        delay = start - asyncio.get_running_loop().time()
        if delay > 0 and not self.hurry.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.hurry.wait(), delay)


class HealthChecker:
    """The sweep job handler, the probe limits, and the outcome rules."""

    def __init__(
        self,
        store: IntegrationStore,
        cipher: MwapCipher,
        http: aiohttp.ClientSession,
        settings: HealthSettings,
        clock: Callable[[], datetime],
        *,
        engine: Engine,
        operations: Operations,
        refresh: RefreshSettings | None,
        user_agent: str = "MWAP-OAuth-Client/1.0",
        policy: UrlPolicy | None = None,
    ) -> None:
        """`refresh` is None when token refresh is off here: a 401 then counts as a failure.
        `policy` decides where access tokens may be sent (default: https to the known
        hosts of each provider kind)."""
        self.policy = policy or UrlPolicy()
        self.store = store
        self.cipher = cipher
        self.http = http
        self.settings = settings
        self.clock = clock
        self.engine = engine
        self.operations = operations
        self.refresh = refresh
        self.user_agent = user_agent
        self.limiter = KeyedLimiter(settings.provider_concurrency, settings.provider_rate)
        self._slots = asyncio.Semaphore(settings.concurrency)
        self.in_flight = 0
        self.max_in_flight = 0
        self.probes = 0
        self.last_sweep: dict[str, Any] | None = None
        self._sweep: _Sweep | None = None

    # -- the queue and its schedule ------------------------------------------------

    def register(self, registry: QueueRegistry) -> None:
        """One sweep at a time, never retried (the next fire is the retry), and a timeout
        above the longest gap of the cron, since a spread sweep lasts most of it."""
        registry.register(QUEUE, self, attempts=1, concurrency=1,
                          timeout=_sweep_timeout(self.settings.cron, self.settings.timezone))

    def schedule_data(self) -> dict[str, Any]:
        return {"spread": self.settings.spread, "cron": self.settings.cron,
                "timezone": self.settings.timezone}

    async def keep_scheduled(self) -> None:
        """Create or update the repeat once the engine runs; retried while MongoDB fails."""
        delay = 1.0
        while True:
            try:
                await self.engine.repeat(QUEUE, self.schedule_data(), cron=self.settings.cron,
                                         timezone=self.settings.timezone, job_id=SWEEP_JOB_ID)
                log.info("health checks scheduled", extra={"cron": self.settings.cron,
                         "timezone": self.settings.timezone, "spread": self.settings.spread})
                return
            except ValueError as exc:
                log.error("health checks NOT scheduled: health.cron or health.timezone is "
                          "invalid; fix the configuration and restart",
                          extra={"error": str(exc)})
                return
            except Exception as exc:
                log.warning("could not schedule health checks; retrying",
                            extra={"error": f"{type(exc).__name__}: {exc}"[:300],
                                   "retryIn": delay})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)

    async def check_now(self, requested_by: str) -> dict[str, Any]:
        """Sweep now without spreading: add the run, or hurry the one running here.

        Returns `{runId, state, created, hurried}`; `state == "active"` with
        `hurried == False` means a sweep is running in another process.
        """
        added = await self.engine.add(
            QUEUE, {"spread": False, "trigger": "manual", "requestedBy": requested_by},
            job_id=SWEEP_JOB_ID, replace=True, priority=MANUAL_PRIORITY)
        hurried = added.state == "active" and self.hurry(added.run_id)
        return {"runId": added.run_id, "state": added.state, "created": added.created,
                "hurried": hurried}

    def hurry(self, run_id: str | None = None) -> bool:
        """Start the remaining probes of the sweep running here now; False if there is none."""
        sweep = self._sweep
        if sweep is None or (run_id is not None and sweep.run_id != run_id):
            return False
        if not sweep.hurry.is_set():
            log.info("health sweep hurried: remaining probes start now",
                     extra={"runId": sweep.run_id})
        sweep.hurry.set()
        sweep.report.hurried = True
        return True

    def interrupt(self) -> None:
        """The daemon is stopping: start no more probes, so the running sweep ends as soon
        as the probes in flight do (well within the shutdown timeout) and completes with
        what it checked. The integrations it did not reach are checked by the next one."""
        sweep = self._sweep
        if sweep is not None and not sweep.interrupted:
            log.info("health sweep interrupted by shutdown",
                     extra={"runId": sweep.run_id, "checked": sweep.report.checked,
                            "integrations": sweep.planned})
            sweep.interrupted = sweep.report.interrupted = True
            sweep.hurry.set()  # wakes the lanes waiting for their start time

    def progress(self) -> dict[str, Any] | None:
        sweep = self._sweep
        if sweep is None:
            return None
        return {"runId": sweep.run_id, "startedAt": sweep.started_at,
                "integrations": sweep.planned, "checked": sweep.report.checked,
                "window": round(sweep.window, 3), "hurried": sweep.report.hurried}

    # -- the handler -----------------------------------------------------------------

    async def __call__(self, job: Job) -> dict[str, Any]:
        window = self.spread_window(job.data, job.created_at)
        report = await self.sweep(window=window, run_id=job.run_id)
        return report.as_dict()

    def spread_window(self, data: dict[str, Any], created_at: datetime) -> float:
        """Seconds over which to spread the probes: 0 unless `data.spread`, else
        SPREAD_FRACTION of the time until the next fire (`data.every` s after the fire
        for an interval repeat, else the next time of `data.cron`)."""
        if not data.get("spread"):
            return 0.0
        now = self.clock()
        every = data.get("every")
        if isinstance(every, int | float) and not isinstance(every, bool) and every > 0:
            next_fire: datetime | None = as_utc(created_at) + timedelta(seconds=float(every))
        else:
            try:
                trigger = make_trigger(str(data.get("cron") or self.settings.cron), None,
                                       str(data.get("timezone") or self.settings.timezone))
            except ValueError:
                return 0.0
            next_fire = trigger.get_next_fire_time(None, now + timedelta(seconds=1))
        if next_fire is None:
            return 0.0
        return max(0.0, (next_fire - now).total_seconds()) * SPREAD_FRACTION

    async def sweep(self, *, window: float = 0.0, run_id: str | None = None) -> SweepReport:
        """Probe every connected integration once; start times spread over `window` s."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        started_at = self.clock()
        docs = await self.store.connected_integrations()
        providers = await self.store.providers_by_id()
        read_at = loop.time()
        ids = sorted(str(d["_id"]) for d in docs)
        # Our notes are only needed to conclude: read them while the first probes run.
        states = asyncio.ensure_future(self._notes(ids))
        writer = _Writer(self.store, {i: n for n, i in enumerate(ids)},
                         self.settings.history_size, states)
        report = SweepReport(integrations=len(docs), window=round(window, 3),
                             read_seconds=round(read_at - t0, 3))
        sweep = _Sweep(run_id, window, started_at, t0, providers, writer, report, states,
                       planned=len(docs))
        lanes: dict[str, list[_Item]] = {}
        for doc in docs:
            integration_id = str(doc["_id"])
            lanes.setdefault(str(doc.get("providerId")), []).append(_Item(
                id=integration_id, doc=doc, provider_key=str(doc.get("providerId")),
                start=t0 + offset_fraction(integration_id) * window, read_at=read_at))
        log.info("health sweep started", extra={"runId": run_id, "integrations": len(docs),
                 "providers": len(lanes), "window": round(window, 3)})
        self._sweep = sweep
        try:
            async with asyncio.TaskGroup() as outer:
                outer.create_task(writer.run())
                try:
                    async with asyncio.TaskGroup() as work:
                        for key, items in lanes.items():
                            queue = deque(sorted(items, key=lambda i: (i.start, i.id)))
                            for _ in range(min(self.settings.provider_concurrency, len(queue))):
                                work.create_task(self._lane(sweep, queue, work),
                                                 name=f"mwapjobs:health-lane:{key}")
                finally:
                    writer.close()
        finally:
            if self._sweep is sweep:
                self._sweep = None
            if not states.done():
                states.cancel()
        report.seconds = round(loop.time() - t0, 3)
        report.writes = writer.writes
        report.write_seconds = round(writer.db_seconds, 3)
        self.last_sweep = {"runId": run_id, "startedAt": started_at,
                           "finishedAt": self.clock(), **report.as_dict()}
        log.info("health sweep finished", extra={"runId": run_id, **report.as_dict()})
        return report

    async def _notes(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        """Our notes on every integration; the missing ones are made (results update)."""
        states = await self.store.health_states()
        await self.store.create_health_states([i for i in ids if i not in states])
        return states

    async def _lane(self, sweep: _Sweep, queue: deque[_Item], work: asyncio.TaskGroup) -> None:
        while queue and not sweep.interrupted:
            item = queue.popleft()
            await sweep.wait_until(item.start)
            if sweep.interrupted:
                return
            try:
                await self._check(sweep, item, work)
            except Exception:
                log.exception("health check crashed", extra={"integrationId": item.id})
                sweep.report.skipped += 1

    # -- one integration -----------------------------------------------------------------

    async def _check(self, sweep: _Sweep, item: _Item, work: asyncio.TaskGroup) -> None:
        loop = asyncio.get_running_loop()
        doc: dict[str, Any] | None = item.doc
        if loop.time() - item.read_at > TOKEN_MAX_AGE:
            doc = await self._reread(item)
            if doc is None:
                sweep.report.skipped += 1
                return
        assert doc is not None
        provider = sweep.providers.get(item.provider_key)
        if provider is None:
            await self._conclude(sweep, item, doc, "skipped",
                                 ProbeResult("skipped", f"provider {item.provider_key} not found"))
            return
        spec, revoked = sweep.spec(item.provider_key, provider)
        if spec.url is None:
            await self._conclude(sweep, item, doc, "skipped", ProbeResult(
                "skipped", f"no probe URL for provider {item.provider_key} (set its "
                           "metadata.apiBaseUrl or metadata.healthCheckUrl)"))
            return
        refusal = self.policy.refusal(spec.url, spec.kind)
        if refusal is not None:  # the access token is never sent there
            await self._conclude(sweep, item, doc, "skipped", ProbeResult(
                "skipped", f"the probe URL of provider {item.provider_key} is refused by "
                           f"the outbound policy: {refusal}"))
            return
        if self._past_expiry(doc) and loop.time() - item.read_at > 1.0:
            doc = await self._reread(item)  # the refresher may have been quicker
            if doc is None:
                sweep.report.skipped += 1
                return
        if self._past_expiry(doc):
            await sweep.note(item)
            if self._refreshable(item, doc):
                work.create_task(self._refresh_then_probe(sweep, item, doc, spec, provider,
                                                          None))
                return
        result = await self._probe(spec, revoked, doc, provider)
        await sweep.note(item)
        if result.verdict == "unauthorized":
            work.create_task(self._refresh_then_probe(sweep, item, doc, spec, provider, result))
            return
        await self._conclude(sweep, item, doc, _finding(result), result)

    async def _reread(self, item: _Item) -> dict[str, Any] | None:
        doc = await self.store.get(item.id)
        item.read_at = asyncio.get_running_loop().time()
        if doc is None or doc.get("status") == "revoked" or not doc.get("accessToken"):
            return None  # deleted, revoked or disconnected since the sweep started
        item.doc = doc
        return doc

    def _past_expiry(self, doc: dict[str, Any]) -> bool:
        expires = doc.get("tokenExpiresAt")
        return isinstance(expires, datetime) and as_utc(expires) <= self.clock()

    def _refreshable(self, item: _Item, doc: dict[str, Any]) -> bool:
        token = doc.get("refreshToken")
        return (self.refresh is not None and bool(token)
                and item.dead_refresh != fingerprint(token))

    async def _probe(self, spec: ProbeSpec, revoked: frozenset[str], doc: dict[str, Any],
                     provider: dict[str, Any]) -> ProbeResult:
        token = self.cipher.decrypt_lenient(str(doc.get("accessToken") or ""))
        async with self._slots, self.limiter.slot(str(provider["_id"])):
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                return await probes.probe(
                    self.http, spec, token, timeout=self.settings.request_timeout,
                    user_agent=self.user_agent,
                    revoked=revoked)
            finally:
                self.in_flight -= 1
                self.probes += 1

    async def _refresh_then_probe(self, sweep: _Sweep, item: _Item, doc: dict[str, Any],
                                  spec: ProbeSpec, provider: dict[str, Any],
                                  first: ProbeResult | None) -> None:
        """A stale token: refresh it at high priority through the token-refresh queue
        (so it never races the scheduled refresh), then probe again with the new one."""
        try:
            await self._refresh_then_probe_unguarded(sweep, item, doc, spec, provider, first)
        except Exception:
            log.exception("health check crashed", extra={"integrationId": item.id})
            sweep.report.skipped += 1

    async def _refresh_then_probe_unguarded(
        self, sweep: _Sweep, item: _Item, doc: dict[str, Any], spec: ProbeSpec,
        provider: dict[str, Any], first: ProbeResult | None,
    ) -> None:
        why = first.message if first else "the access token is past tokenExpiresAt"
        code, latency = (first.http_status, first.latency_ms) if first else (None, None)
        token = doc.get("refreshToken")
        if self.refresh is None:
            await self._conclude(sweep, item, doc, "failure", ProbeResult(
                "failure", f"{why}; token refresh is disabled on this daemon", code, latency))
            return
        if not token:
            await self._conclude(sweep, item, doc, "expired", ProbeResult(
                "forbidden", f"{why}; there is no refresh token, the tenant must reconnect",
                code, latency))
            return
        if item.dead_refresh == fingerprint(token):
            await self._conclude(sweep, item, doc, "expired", ProbeResult(
                "forbidden", f"{why}; the refresh token was already refused, the tenant "
                             "must reconnect", code, latency))
            return
        if sweep.interrupted:  # no new refresh while the daemon stops
            sweep.report.skipped += 1
            return
        hold = await self.store.holds.get(item.provider_key)
        if hold is not None:  # the provider's own configuration is broken: not the tenant's
            await self._conclude(sweep, item, doc, "skipped", _held(why, hold, code, latency))
            return
        run = await self._run_refresh(doc)
        fresh = await self.store.get(item.id)
        if fresh is None or fresh.get("status") == "revoked" or not fresh.get("accessToken"):
            sweep.report.skipped += 1
            return
        if fresh.get("accessToken") != doc.get("accessToken"):
            sweep.report.refreshed += 1
            item.doc = fresh
            result = await self._probe(spec, sweep.spec(item.provider_key, provider)[1],
                                       fresh, provider)
            if result.verdict == "unauthorized":
                result = ProbeResult("failure", f"{result.message}, even just after a token "
                                     "refresh", result.http_status, result.latency_ms)
            await self._conclude(sweep, item, fresh, _finding(result), result, refreshed=True)
            return
        if _postponed(run):  # its provider was put on hold by this very refresh
            hold = await self.store.holds.get(item.provider_key, fresh=True) or {
                "error": str((run.get("attempts") or [{}])[-1].get("reason"))[:100]}
            await self._conclude(sweep, item, fresh, "skipped", _held(why, hold, code, latency))
            return
        error = run.get("error") or {}
        if (run.get("state") == "failed" and error.get("permanent")) or (
                fresh.get("status") == "expired" and doc.get("status") != "expired"):
            await self._conclude(sweep, item, fresh, "refresh_refused", ProbeResult(
                "forbidden", f"{why}; {error.get('message') or 'the refresh was refused'}",
                code, latency))
            return
        state = run.get("state")
        detail = error.get("message") or (f"still {state} after "
                                          f"{self.refresh.wait_timeout:g}s" if state else "")
        await self._conclude(sweep, item, fresh, "failure", ProbeResult(
            "failure", f"{why}; the token refresh did not succeed ({detail})", code, latency))

    async def _run_refresh(self, doc: dict[str, Any]) -> dict[str, Any]:
        """What the manual refresh endpoint does: the integration's refresh job, now and
        first in line, then wait for its outcome (at most refresh.wait_timeout)."""
        assert self.refresh is not None
        expires = doc.get("tokenExpiresAt")
        deadline = as_utc(expires) if isinstance(expires, datetime) else None
        integration_id = str(doc["_id"])
        added = await self.engine.add(
            REFRESH_QUEUE, refresh_run_data(doc),
            job_id=refresh_job_id(integration_id), priority=MANUAL_PRIORITY, replace=True,
            deadline=deadline if deadline and deadline > self.clock() else None,
        )
        return await self._wait_refresh(added.run_id, self.refresh.wait_timeout)

    async def _wait_refresh(self, run_id: str, timeout: float) -> dict[str, Any]:
        """The run once it finished, or once its handler postponed it (its provider went
        on hold: the engine sends no event for that), or as it is after `timeout` s."""
        waiter = asyncio.ensure_future(self.operations.wait_finished(run_id, timeout))
        try:
            while True:
                done, _ = await asyncio.wait({waiter}, timeout=POSTPONE_POLL)
                if done:
                    return waiter.result()
                view = await self.operations.get_run(run_id)
                if _postponed(view):
                    return view
        finally:
            if not waiter.done():
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiter

    async def _conclude(self, sweep: _Sweep, item: _Item, doc: dict[str, Any],
                        finding: Finding, result: ProbeResult, *,
                        refreshed: bool = False) -> None:
        """Apply the rules to one result: status writes now, our notes in the next batch."""
        await sweep.note(item)
        now = self.clock()
        status = str(doc.get("status") or "active")
        set_by_us = item.set_status
        streak = item.failures
        outcome: Outcome
        changed = False
        context = {"integrationId": item.id, "tenantId": doc.get("tenantId"),
                   "providerId": item.provider_key, "httpStatus": result.http_status,
                   "reason": result.message}
        if finding == "healthy":
            streak, outcome = 0, "healthy"
            if status in ("expired", "error") and set_by_us == status:
                if await self.store.set_status(doc, "active", now, only_from=(status,)):
                    log.info("integration healthy again; status back to active",
                             extra={**context, "was": status})
                    status, set_by_us, changed = "active", None, True
            elif status == "active":
                set_by_us = None  # whatever we set was undone (a reconnect, say)
        elif finding == "failure":
            streak += 1
            if streak >= self.settings.failure_threshold and status == "active" and \
                    await self.store.set_status(doc, "error", now, only_from=("active",)):
                status, set_by_us, changed = "error", "error", True
                log.warning("integration marked error after consecutive failed health checks",
                            extra={**context, "consecutiveFailures": streak})
            outcome = "error" if status == "error" else "failing"
            log.warning("health check failed", extra={**context, "consecutiveFailures": streak,
                                                      "threshold": self.settings.failure_threshold,
                                                      "status": status})
        elif finding == "expired":
            streak, outcome = 0, "expired"
            if status in ("active", "error") and await self.store.set_status(
                    doc, "expired", now, only_from=("active", "error")):
                status, set_by_us, changed = "expired", "expired", True
                await self.store.notify("integration.expired", doc, result.message, now)
                log.warning("integration marked expired by a health check", extra=context)
        elif finding == "refresh_refused":
            # The refresher marked it expired and notified; that status is not ours to undo.
            streak, outcome = 0, "expired"
            status = str(doc.get("status") or status)
            log.warning("health check: the token refresh was refused", extra=context)
        elif finding == "revoked":
            streak, outcome = 0, "revoked"
            if status != "revoked" and await self.store.set_status(doc, "revoked", now):
                status, set_by_us, changed = "revoked", "revoked", True
                await self.store.notify("integration.revoked", doc, result.message, now)
                log.warning("integration marked revoked: the provider says access was revoked",
                            extra=context)
        else:
            outcome = "skipped"
            log.info("health check skipped", extra=context)
        if finding == "healthy":
            log.debug("health check passed", extra=context)
        entry = {"at": now, "outcome": outcome, "status": status,
                 "httpStatus": result.http_status, "latencyMs": result.latency_ms,
                 "message": result.message[:300], "refreshed": refreshed}
        if outcome == "healthy":
            item.last_healthy = now
        if finding == "failure":
            item.last_failure = now
        item.failures, item.set_status = streak, set_by_us
        sweep.writer.add(item.id, {
            "at": now, "entry": entry, "consecutiveFailures": streak, "setStatus": set_by_us,
            "lastHealthyAt": item.last_healthy, "lastFailureAt": item.last_failure,
            "tenantId": doc.get("tenantId"), "providerId": item.provider_key,
        })
        report = sweep.report
        report.checked += 1
        setattr(report, outcome, getattr(report, outcome) + 1)
        report.changed += int(changed)


_FINDINGS: dict[probes.Verdict, Finding] = {
    "ok": "healthy", "unauthorized": "failure", "revoked": "revoked", "forbidden": "expired",
    "failure": "failure", "skipped": "skipped",
}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _finding(result: ProbeResult) -> Finding:
    return _FINDINGS[result.verdict]


def _postponed(run: dict[str, Any]) -> bool:
    """A refresh run put back by its handler (its provider is on hold), not finished."""
    attempts = run.get("attempts") or []
    return (run.get("state") in ("delayed", "waiting") and bool(attempts)
            and attempts[-1].get("outcome") == "postponed")


def _held(why: str, hold: dict[str, Any], code: int | None,
          latency: float | None) -> ProbeResult:
    """A stale token whose refresh waits for its provider's hold: skipped, never a status
    change nor a counted failure (the tenant can do nothing about it)."""
    return ProbeResult("skipped", f"{why[:120]}; the provider is on hold ({hold.get('error')}): "
                                  "the token refresh waits until it is fixed, status unchanged",
                       code, latency)


class _Writer:
    """Batches the per-integration results of a sweep into few `record_health` calls.

    A result waits at most FLUSH_DELAY s, or less when FLUSH_MAX are waiting; one
    batch is written at a time while the probes go on, so the writes of a fast
    sweep hide behind its probing and only the last batch adds to its duration.
    Each batch is cut into runs that are dense in id order (`RUN_GAP`, at most
    MAX_RUN), one range update each: a fast sweep of 10,000 integrations makes
    about five writes, a spread one a few small ones every FLUSH_DELAY s.
    """

    def __init__(self, store: IntegrationStore, positions: dict[str, int],
                 history_size: int, notes: asyncio.Future[Any]) -> None:
        self.store = store
        self.positions = positions
        self.history_size = history_size
        self.notes = notes
        self.pending: list[tuple[str, dict[str, Any]]] = []
        self.writes = 0
        self.db_seconds = 0.0
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        self._closing = False

    def add(self, integration_id: str, result: dict[str, Any]) -> None:
        self.pending.append((integration_id, result))
        self._wake.set()
        if len(self.pending) >= FLUSH_MAX:
            self._full.set()

    def close(self) -> None:
        self._closing = True
        self._wake.set()
        self._full.set()

    async def run(self) -> None:
        await asyncio.shield(self.notes)  # the documents must exist before we update them
        while True:
            if not self.pending:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if not self._closing and len(self.pending) < FLUSH_MAX:
                self._full.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), FLUSH_DELAY)
            batch, self.pending = self.pending, []
            await self._flush(batch)

    async def _flush(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        latest = {i: r for i, r in batch}  # the same integration twice: the later one wins
        ordered = sorted(latest.items(), key=lambda r: (self.positions.get(r[0], -1), r[0]))
        runs: list[list[tuple[str, dict[str, Any]]]] = []
        previous = None
        for integration_id, result in ordered:
            position = self.positions.get(integration_id)
            if (not runs or position is None or previous is None
                    or position - previous > RUN_GAP or len(runs[-1]) >= MAX_RUN):
                runs.append([])
            runs[-1].append((integration_id, result))
            previous = position
        started = time.monotonic()
        for run in runs:
            try:
                await self.store.record_health(run, self.history_size)
                self.writes += 1
            except Exception as exc:
                log.warning("could not record health results; they are lost, the next "
                            "sweep records new ones",
                            extra={"count": len(run),
                                   "error": f"{type(exc).__name__}: {exc}"[:300]})
        self.db_seconds += time.monotonic() - started


def _sweep_timeout(cron: str, timezone: str) -> float:
    """1.5 x the longest gap between the next fires of `cron`, at least an hour."""
    try:
        trigger = make_trigger(cron, None, timezone)
    except ValueError:
        return 6 * 3600.0
    now = datetime.now(trigger.timezone)
    fires: list[datetime] = []
    previous = None
    for _ in range(50):
        fire = trigger.get_next_fire_time(previous, now if previous is None
                                          else previous + timedelta(seconds=1))
        if fire is None:
            break
        fires.append(fire)
        previous = fire
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(fires)]
    return max(3600.0, 1.5 * max(gaps, default=3600.0))


async def unschedule(engine: Engine) -> None:
    """Health checks are off: drop a repeat left from when they were on."""
    try:
        if await engine.remove_repeat(QUEUE, SWEEP_JOB_ID):
            log.info("health checks are disabled; removed their schedule")
    except Exception as exc:
        log.warning("could not remove the health-check schedule",
                    extra={"error": f"{type(exc).__name__}: {exc}"[:300]})
