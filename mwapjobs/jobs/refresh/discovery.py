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
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
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

    async def step(self) -> None:
        """One pass, logged when it changed something (a background loop runs it every
        `refresh.sync_interval` seconds)."""
        report = await self.sync_once()
        if report.added or report.moved or report.dropped or report.expired:
            log.info("refresh schedule updated", extra=vars(report))

    def due_time(self, doc: dict[str, Any], dead_tokens: dict[str, str]) -> datetime | None:
        """When this integration's refresh is due, or None if it must not be refreshed."""
        if doc.get("status") == "revoked" or not doc.get("refreshToken"):
            return None
        if not isinstance(doc.get("tokenExpiresAt"), datetime):
            return None
        integration_id = str(doc["_id"])
        if dead_tokens.get(integration_id) == fingerprint(doc["refreshToken"]):
            return None  # refused for good; waits for the tenant to reconnect
        return due_time(integration_id, doc["tokenExpiresAt"], self.settings)

    async def sync_once(self, full: bool | None = None) -> SyncReport:
        full = self._passes % FULL_EVERY == 0 if full is None else full
        started = self.clock()
        docs = await self.store.changed_since(None if full else self._watermark)
        dead_tokens = await self.store.states_with_refresh_failure()
        job_ids = None if full else [job_id(str(d["_id"])) for d in docs]
        pending = await self.engine.runs.pending_by_job(QUEUE, job_ids)
        report = SyncReport(full=full, seen=len(docs))
        await self._lift_changed_providers(report)
        if full:
            await self._watch_provider_urls()
        now = self.clock()
        for doc in docs:
            jid = job_id(str(doc["_id"]))
            due = self.due_time(doc, dead_tokens)
            have = pending.pop(jid, None)
            if due is None:
                if have is not None and await self.engine.cancel(QUEUE, jid):
                    report.dropped += 1
                if _dead_without_refresh_token(doc, now) and await self._expire(doc, now):
                    report.expired += 1
                continue
            if have is not None and (have["state"] == "active"
                                     or not _tokens_changed(have, doc)):
                continue  # scheduled for these tokens: the engine's run, as it is
            await self.engine.add(
                QUEUE, run_data(doc, refused_before=str(doc["_id"]) in dead_tokens),
                job_id=jid, run_at=max(due, now),
                deadline=as_utc(doc["tokenExpiresAt"]), replace=True,
            )
            if have is None:
                report.added += 1
            else:
                report.moved += 1
        if full:  # what is left pending belongs to integrations that no longer exist
            for jid in pending:
                if await self.engine.cancel(QUEUE, jid):
                    report.dropped += 1
        stamps = [d["updatedAt"] for d in docs if isinstance(d.get("updatedAt"), datetime)]
        if stamps:
            self._watermark = max([as_utc(s) for s in stamps] + ([self._watermark]
                                                                if self._watermark else []))
        self._passes += 1
        self.last_sync = started
        return report

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

    async def _watch_provider_urls(self) -> None:
        """Log (and, through the `provider_url_changed` alert, tell operators) when a
        provider's token or API URL points somewhere new: whoever can change those
        receives its secrets. Two queries per full pass, a write only on a change."""
        holds = self.store.holds
        known = await holds.known_urls()
        now = self.clock()
        for provider_id, provider in (await self.store.providers_by_id()).items():
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

    async def _lift_changed_providers(self, report: SyncReport) -> None:
        """A held provider whose document changed (or went away) since it was held: lift
        the hold and promote its postponed runs. One query when nothing is held."""
        holds = self.store.holds
        for doc in await holds.all():
            provider_id = str(doc["_id"])
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
