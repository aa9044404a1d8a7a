"""Discovery: keep exactly one refresh job per refreshable integration.

The refresher schedules each integration's next refresh itself (cycle.py). The MWAP
backend creates, reconnects and deletes integrations without telling us, so a
loop reconciles our `token-refresh` runs with the data every
`refresh.sync_interval` seconds:
- an incremental pass reads only integrations whose `updatedAt` moved (by our
  `mwapjobs_updatedAt` index), and the pending refresh runs of just those;
- every `FULL_EVERY` passes (and at start) a full pass reads every
  integration once, which also catches deletions.
Either way it is a handful of queries however many integrations there are.

What discovery decides, and nothing more:
- it *adds* the job of an integration that has none;
- it *drops* the job of a deleted, revoked or disconnected integration (and of
  one whose refresh token was refused for good);
- it *moves* a pending job only when the integration's tokens changed since the
  job was scheduled (a reconnect; `data.connection`, see
  `runs.connection_fingerprint`). Everything else about a pending run
  (a retry's backoff, a provider's Retry-After, a manual or health-triggered
  run at high priority, a postponement while its provider is on hold) belongs
  to the engine and is left alone;
- it marks `expired` an integration whose access token expired with no refresh
  token to renew it (so the tenant can reconnect), with a notification;
- it lifts the hold of a provider whose document changed since it was held
  (the operator fixed it), and promotes that provider's postponed runs.

The same decisions apply to a few integrations or providers named by a change stream
(`sync_integrations`, `sync_providers`; follow.py): one code path, whoever asks. Passes
take turns (a lock), so a pass and a change never reconcile the same run at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal
from urllib.parse import urlsplit

from ...config import RefreshSettings
from ...engine import Engine, as_utc
from ...storage.integrations import IntegrationStore
from ...storage.providers import config_fingerprint
from ...supervisor import Supervisor
from .cycle import due_time
from .handler import resume_postponed
from .runs import QUEUE, connection_fingerprint, fingerprint, job_id, run_data

log = logging.getLogger(__name__)

FULL_EVERY = 10
DEAD_TOKEN_REASON = ("the access token expired and there is no refresh token to renew it: "
                     "the tenant must reconnect")


@dataclass
class SyncReport:
    full: bool
    seen: int = 0
    added: int = 0
    moved: int = 0
    dropped: int = 0
    expired: int = 0  # access token expired without a refresh token: marked expired
    lifted: int = 0  # provider holds ended because the provider's document changed
    source: str = "poll"  # "poll": a pass of the loop; "change-stream": changes followed

    @property
    def changed(self) -> bool:
        """Did it change the schedule (or an integration's status)?"""
        return bool(self.added or self.moved or self.dropped or self.expired)


class RefreshSync:
    def __init__(self, engine: Engine, store: IntegrationStore, settings: RefreshSettings,
                 clock: Callable[[], datetime], tasks: Supervisor | None = None) -> None:
        self.engine = engine
        self.store = store
        self.settings = settings
        self.clock = clock
        self.last_sync: datetime | None = None
        self._watermark: datetime | None = None
        self._passes = 0
        self.tasks = tasks or Supervisor()  # where promotions after a lifted hold run
        self._turn = asyncio.Lock()  # one pass (or batch of changes) at a time

    async def step(self) -> None:
        """One pass, logged when it changed something (a background loop runs it every
        `refresh.sync_interval` seconds)."""
        log_report(await self.sync_once())

    def due_time(self, doc: dict[str, Any], dead_tokens: dict[str, str]) -> datetime | None:
        """When this integration's refresh is due, or None if it must not be refreshed."""
        return refresh_due(doc, dead_tokens, self.settings)

    async def sync_once(self, full: bool | None = None) -> SyncReport:
        async with self._turn:
            full = self._passes % FULL_EVERY == 0 if full is None else full
            started = self.clock()
            # A full pass reads the pending runs before the integrations: what it drops
            # as belonging to no integration then belongs to none in a list read after
            # it (an integration created meanwhile, refreshed by hand at once, keeps the
            # run it was given).
            pending = await self.engine.runs.pending_by_job(QUEUE) if full else None
            docs = await self.store.changed_since(None if full else self._watermark)
            report = SyncReport(full=full, seen=len(docs))
            await self._lift_changed_providers(report)
            if full:
                await self._watch_provider_urls()
            if pending is None:
                pending = await self.engine.runs.pending_by_job(
                    QUEUE, [job_id(str(d["_id"])) for d in docs])
            # After a full pass, what is left pending belongs to integrations that no
            # longer exist.
            await self._reconcile(docs, pending, report, drop_rest=full)
            stamps = [as_utc(d["updatedAt"]) for d in docs
                      if isinstance(d.get("updatedAt"), datetime)]
            if stamps:
                self._watermark = max(stamps + ([self._watermark] if self._watermark else []))
            self._passes += 1
            self.last_sync = started
            return report

    async def sync_integrations(self, keys: Sequence[Any],
                                untouched: Collection[str] = ()) -> SyncReport:
        """Reconcile these integrations (their `_id`s as stored), as a pass would: the
        job of one that no longer exists is dropped. For a change stream's changes;
        `untouched` (hex ids): those whose changes left the tokens alone, which gain no
        run here (see `decide`)."""
        async with self._turn:
            pending = await self.engine.runs.pending_by_job(
                QUEUE, [job_id(str(k)) for k in keys])  # before the documents: see sync_once
            docs = await self.store.by_ids(keys)
            report = SyncReport(full=False, seen=len(docs), source="change-stream")
            await self._reconcile(docs, pending, report, drop_rest=True, untouched=untouched)
            return report

    async def sync_providers(self, provider_ids: Collection[str] | None) -> SyncReport:
        """What a full pass does for these providers (all when None): forget the copy the
        refresher keeps, lift a hold whose provider changed, notice a new token or API
        URL. For a change stream's changes to `cloudProviders`."""
        async with self._turn:
            report = SyncReport(full=provider_ids is None, source="change-stream")
            for provider_id in provider_ids or ():
                self.store.forget_provider(provider_id)
            await self._lift_changed_providers(report, provider_ids)
            await self._watch_provider_urls(provider_ids)
            return report

    async def _reconcile(self, docs: list[dict[str, Any]], pending: dict[str, dict[str, Any]],
                         report: SyncReport, *, drop_rest: bool,
                         untouched: Collection[str] = ()) -> None:
        """Add, move or drop the runs of `docs` (`pending`: their runs as read, by job id;
        consumed); with `drop_rest`, drop what is pending for none of `docs`."""
        dead_tokens = await self.store.states_with_refresh_failure()
        now = self.clock()
        for doc in docs:
            jid = job_id(str(doc["_id"]))
            have = pending.pop(jid, None)
            step = decide(doc, have, dead_tokens, now, self.settings,
                          may_add=str(doc["_id"]) not in untouched)
            if step.run == "drop" and await self.engine.cancel(QUEUE, jid):
                report.dropped += 1
            if step.expire and await self._expire(doc, now):
                report.expired += 1
            if step.run_at is None:
                continue
            data = run_data(doc, refused_before=str(doc["_id"]) in dead_tokens)
            deadline = as_utc(doc["tokenExpiresAt"])
            # Neither touches a run that appeared or changed since `pending` was read (a
            # manual or health refresh, due now): that run is the engine's, as it is.
            if step.run == "add":
                await self.engine.add(QUEUE, data, job_id=jid, run_at=step.run_at,
                                      deadline=deadline)
                report.added += 1
            elif step.run == "move" and have is not None and await self.engine.move(
                    QUEUE, have, data, run_at=step.run_at, deadline=deadline):
                report.moved += 1
        if drop_rest:  # pending for an integration that no longer exists: decide(None, ...)
            for jid in pending:
                if await self.engine.cancel(QUEUE, jid):
                    report.dropped += 1

    async def _expire(self, doc: dict[str, Any], now: datetime) -> bool:
        """Mark an integration whose access token expired with no refresh token `expired`
        (an `active` one would stop the backend's reconnect), with the backend's
        conditional filter, and record a notification. Re-reads it: the status write
        repeats the tokens, which discovery does not read."""
        current = await self.store.get(str(doc["_id"]))
        if current is None or not current.get("accessToken") \
                or not _dead_without_refresh_token(current, now):
            return False
        if not await self.store.set_status(current, "expired", now,
                                           only_from=("active", "error")):
            return False
        await self.store.notifications.record("integration.expired", current,
                                              DEAD_TOKEN_REASON, now)
        log.warning("access token expired with no refresh token; integration marked expired",
                    extra={"integrationId": str(current["_id"]),
                           "tenantId": current.get("tenantId"),
                           "providerId": current.get("providerId")})
        return True

    async def _watch_provider_urls(self, only: Collection[str] | None = None) -> None:
        """Log (and, through the `provider_url_changed` alert, tell operators) when a
        provider's token or API URL points somewhere new: whoever can change those
        receives its secrets. Two queries per full pass, a write only on a change."""
        holds = self.store.holds
        known = await holds.known_urls()
        now = self.clock()
        for provider_id, provider in (await self.store.providers_by_id(only)).items():
            urls = outbound_urls(provider)
            before = known.get(provider_id)
            if before == urls:
                continue
            changes = [] if before is None else [
                {"field": field, "from": before.get(field, ""), "to": urls.get(field, "")}
                for field in sorted(set(before) | set(urls))
                if before.get(field) != urls.get(field)]
            for change in changes:
                log.warning("provider URL changed: credentials now go to the new address",
                            extra={"providerId": provider_id, "provider": provider.get("name"),
                                   **change})
            await holds.record_urls(provider, urls, changes, now)

    async def _lift_changed_providers(self, report: SyncReport,
                                      only: Collection[str] | None = None) -> None:
        """A held provider (of `only`, when given) whose document changed (or went away)
        since it was held: lift the hold and promote its postponed runs. One query when
        nothing is held."""
        holds = self.store.holds
        for doc in await holds.all():
            provider_id = str(doc["_id"])
            if only is not None and provider_id not in only:
                continue
            hold = doc.get("hold") or {}
            provider = await self.store.provider(provider_id, fresh=True)
            if provider is not None and config_fingerprint(provider) == hold.get("config"):
                continue
            because = ("the provider's configuration changed" if provider is not None
                       else "the provider no longer exists")
            lifted = await holds.lift(provider_id, hold.get("config"), self.clock(), because)
            if lifted is None:
                continue
            report.lifted += 1
            log.info("provider hold lifted; its postponed refreshes resume",
                     extra={"providerId": provider_id, "provider": doc.get("name"),
                            "because": because, "heldSince": lifted.get("since"),
                            "error": lifted.get("error")})
            self.tasks.spawn(f"promote:{provider_id}", resume_postponed(self.engine, provider_id))


@dataclass(frozen=True)
class Step:
    """What an integration's document (as it is now) means for its refresh run."""

    run: Literal["add", "move", "drop", "keep"]  # keep: leave the run (or its absence) be
    run_at: datetime | None = None  # for add and move
    expire: bool = False  # mark the integration expired (no refresh token, token expired)


def refresh_due(doc: dict[str, Any], dead_tokens: dict[str, str],
                settings: RefreshSettings) -> datetime | None:
    """When this integration's refresh is due, or None if it must not be refreshed."""
    if doc.get("status") == "revoked" or not doc.get("refreshToken"):
        return None
    if not isinstance(doc.get("tokenExpiresAt"), datetime):
        return None
    integration_id = str(doc["_id"])
    if dead_tokens.get(integration_id) == fingerprint(doc["refreshToken"]):
        return None  # refused for good; waits for the tenant to reconnect
    return due_time(integration_id, doc["tokenExpiresAt"], settings)


def decide(doc: dict[str, Any] | None, have: dict[str, Any] | None,
           dead_tokens: dict[str, str], now: datetime, settings: RefreshSettings, *,
           may_add: bool = True) -> Step:
    """Discovery's decision for one integration, whoever asks (a pass, or a change
    stream's insert, update, replace or delete): `doc` is its document now (None when
    it was deleted), `have` its pending refresh run (None when it has none). I/O-free.

    A pending run is moved only when the tokens changed since it was scheduled (a
    reconnect); its time otherwise belongs to the engine (a retry's backoff, a hold).
    `may_add=False`: a change that left the tokens alone (a status write, often our
    own after a failed refresh) adds no run; a pass does, at its own pace, so a
    refresh that keeps failing is not retried at the speed of a change stream."""
    due = None if doc is None else refresh_due(doc, dead_tokens, settings)
    if doc is None or due is None:
        expire = doc is not None and _dead_without_refresh_token(doc, now)
        return Step("drop" if have is not None else "keep", expire=expire)
    if have is not None and (have["state"] == "active" or not _tokens_changed(have, doc)):
        return Step("keep")  # scheduled for these tokens: the engine's run, as it is
    if have is None and not may_add:
        return Step("keep")
    return Step("add" if have is None else "move", run_at=max(due, now))


def log_report(report: SyncReport) -> None:
    """The one line a pass (or a batch of changes) writes when it changed the schedule."""
    if report.changed:
        log.info("refresh schedule updated", extra=vars(report))


def _tokens_changed(run: dict[str, Any], doc: dict[str, Any]) -> bool:
    """Were the integration's tokens changed since this pending run was scheduled?

    A run written by discovery (or a health check) carries `data.connection`. One
    without it (added by hand, or by an older version) is judged by its deadline,
    which was the token's expiry when it was added; a run with neither is left alone."""
    connection = (run.get("data") or {}).get("connection")
    if isinstance(connection, str):
        return connection != connection_fingerprint(doc)
    deadline = run.get("deadline")
    if not isinstance(deadline, datetime):
        return False
    return abs(as_utc(deadline) - as_utc(doc["tokenExpiresAt"])) >= timedelta(milliseconds=1)


def _dead_without_refresh_token(doc: dict[str, Any], now: datetime) -> bool:
    """Still `active` (or `error`), no refresh token, and the access token has expired."""
    expires = doc.get("tokenExpiresAt")
    return (doc.get("status", "active") in ("active", "error") and not doc.get("refreshToken")
            and isinstance(expires, datetime) and as_utc(expires) <= now)


def outbound_urls(provider: dict[str, Any]) -> dict[str, str]:
    """The URLs a provider's credentials are sent to, as scheme://host/path (a query
    could hold a key, and is not kept)."""
    raw = provider.get("metadata")
    metadata: dict[str, Any] = raw if isinstance(raw, dict) else {}
    found = {"tokenUrl": provider.get("tokenUrl"),
             "metadata.healthCheckUrl": metadata.get("healthCheckUrl"),
             "metadata.apiBaseUrl": metadata.get("apiBaseUrl")}
    out = {}
    for field, url in found.items():
        if isinstance(url, str) and url:
            parts = urlsplit(url)
            out[field] = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"[:300]
    return out
