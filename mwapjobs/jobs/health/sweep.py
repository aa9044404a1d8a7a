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
  in batches (`IntegrationStore.record_health`, see writer.py), every
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
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import aiohttp

from ...config import HealthSettings, RefreshSettings
from ...crypto import MwapCipher
from ...engine import Engine, as_utc, postponed
from ...outbound import UrlPolicy
from ...queues import Job, QueueRegistry
from ...ratelimit import KeyedLimiter
from ...storage.integrations import IntegrationStore
from ...timeouts import within
from ..refresh.now import refresh_now
from ..refresh.runs import MANUAL_PRIORITY, fingerprint
from . import probes
from .decide import Finding, decide
from .probes import ProbeResult, ProbeSpec
from .schedule import (
    QUEUE,
    SWEEP_JOB_ID,
    offset_fraction,
    spread_window,
    sweep_timeout,
)
from .writer import ResultWriter

log = logging.getLogger(__name__)

TOKEN_MAX_AGE = 60.0  # seconds a token read at the start of a sweep is used without re-reading



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
    writer: ResultWriter
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
                await within(self.hurry.wait(), delay)


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
        refresh: RefreshSettings | None,
        user_agent: str = "MWAP-OAuth-Client/1.0",
        policy: UrlPolicy | None = None,
        shared: KeyedLimiter | None = None,
    ) -> None:
        """`refresh` is None when token refresh is off here: a 401 then counts as a failure.
        `policy` decides where access tokens may be sent (default: https to the known
        hosts of each provider kind); `shared` is the per-provider limiter every job's
        requests share (`JobContext.limiter`)."""
        self.policy = policy or UrlPolicy()
        self.store = store
        self.cipher = cipher
        self.http = http
        self.settings = settings
        self.clock = clock
        self.engine = engine
        self.refresh = refresh
        self.user_agent = user_agent
        self.limiter = KeyedLimiter(settings.provider_concurrency, settings.provider_rate,
                                    within=shared)
        self._slots = asyncio.Semaphore(settings.concurrency)
        self.last_sweep: dict[str, Any] | None = None
        self._sweep: _Sweep | None = None

    # -- the queue and its schedule ------------------------------------------------

    def register(self, registry: QueueRegistry) -> None:
        """One sweep at a time, never retried (the next fire is the retry), and a timeout
        above the longest gap of the cron, since a spread sweep lasts most of it."""
        registry.register(QUEUE, self, attempts=1, concurrency=1,
                          timeout=sweep_timeout(self.settings.cron, self.settings.timezone))

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
        window = spread_window(job.data, job.created_at, self.clock(), self.settings)
        report = await self.sweep(window=window, run_id=job.run_id)
        return report.as_dict()

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
        writer = ResultWriter(self.store, {i: n for n, i in enumerate(ids)},
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
            return await probes.probe(self.http, spec, token,
                                      timeout=self.settings.request_timeout,
                                      user_agent=self.user_agent, revoked=revoked)

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
        if postponed(run):  # its provider was put on hold by this very refresh
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
        """What the manual refresh endpoint does: the integration's refresh now and first
        in line, then its outcome (or its postponement), waiting refresh.wait_timeout."""
        assert self.refresh is not None
        added = await refresh_now(self.engine, doc, self.clock())
        return await added.settled(self.refresh.wait_timeout) or {}

    async def _conclude(self, sweep: _Sweep, item: _Item, doc: dict[str, Any],
                        finding: Finding, result: ProbeResult, *,
                        refreshed: bool = False) -> None:
        """Apply `decide` to one result: a status write and notification now, our notes
        in the next batch."""
        await sweep.note(item)
        now = self.clock()
        status = str(doc.get("status") or "active")
        decision = decide(finding, status, item.set_status, item.failures,
                          self.settings.failure_threshold)
        context = {"integrationId": item.id, "tenantId": doc.get("tenantId"),
                   "providerId": item.provider_key, "httpStatus": result.http_status,
                   "reason": result.message}
        changed = False
        if decision.change is not None and await self.store.set_status(
                doc, decision.change, now, only_from=decision.only_from):
            log.log(logging.INFO if decision.change == "active" else logging.WARNING,
                    _CHANGE_LOGS[decision.change], extra={
                        **context, "was": status, "consecutiveFailures": decision.streak})
            if decision.notify is not None:
                await self.store.notifications.record(decision.notify, doc, result.message,
                                                      now)
            status, decision, changed = decision.change, decision.written(), True
        if finding == "failure":
            log.warning("health check failed", extra={
                **context, "consecutiveFailures": decision.streak,
                "threshold": self.settings.failure_threshold, "status": status})
        elif finding == "refresh_refused":
            log.warning("health check: the token refresh was refused", extra=context)
        elif finding == "skipped":
            log.info("health check skipped", extra=context)
        else:
            log.debug("health check done", extra={**context, "outcome": decision.outcome})
        outcome = decision.outcome
        entry = {"at": now, "outcome": outcome, "status": status,
                 "httpStatus": result.http_status, "latencyMs": result.latency_ms,
                 "message": result.message[:300], "refreshed": refreshed}
        if outcome == "healthy":
            item.last_healthy = now
        if finding == "failure":
            item.last_failure = now
        item.failures, item.set_status = decision.streak, decision.set_status
        sweep.writer.add(item.id, {
            "at": now, "entry": entry, "consecutiveFailures": decision.streak,
            "setStatus": decision.set_status, "lastHealthyAt": item.last_healthy,
            "lastFailureAt": item.last_failure, "tenantId": doc.get("tenantId"),
            "providerId": item.provider_key,
        })
        report = sweep.report
        report.checked += 1
        setattr(report, outcome, getattr(report, outcome) + 1)
        report.changed += int(changed)


# What is logged when a health check changes an integration's status.
_CHANGE_LOGS = {
    "active": "integration healthy again; status back to active",
    "error": "integration marked error after consecutive failed health checks",
    "expired": "integration marked expired by a health check",
    "revoked": "integration marked revoked: the provider says access was revoked",
}

_FINDINGS: dict[probes.Verdict, Finding] = {
    "ok": "healthy", "unauthorized": "failure", "revoked": "revoked", "forbidden": "expired",
    "failure": "failure", "skipped": "skipped",
}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _finding(result: ProbeResult) -> Finding:
    return _FINDINGS[result.verdict]


def _held(why: str, hold: dict[str, Any], code: int | None,
          latency: float | None) -> ProbeResult:
    """A stale token whose refresh waits for its provider's hold: skipped, never a status
    change nor a counted failure (the tenant can do nothing about it)."""
    return ProbeResult("skipped", f"{why[:120]}; the provider is on hold ({hold.get('error')}): "
                                  "the token refresh waits until it is fixed, status unchanged",
                       code, latency)


