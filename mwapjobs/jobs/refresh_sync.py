"""Discovery: keep exactly one refresh job per refreshable integration.

The MWAP backend creates and reconnects integrations without telling us, so a
loop reconciles our `token-refresh` runs with the data every
`refresh.sync_interval` seconds:
- an incremental pass reads only integrations whose `updatedAt` moved (by our
  `mwapjobs_updatedAt` index), and the pending refresh runs of just those;
- every `FULL_EVERY` passes (and at start) a full pass reads every
  integration once, which also catches deletions.
Either way it is a handful of queries however many integrations there are;
a job is added, moved or dropped only where something changed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from ..config import RefreshSettings
from ..engine import Engine, as_utc
from ..storage.integrations import IntegrationStore
from .token_refresh import QUEUE, fingerprint, job_id

log = logging.getLogger(__name__)

FULL_EVERY = 10


@dataclass
class SyncReport:
    full: bool
    seen: int = 0
    added: int = 0
    moved: int = 0
    dropped: int = 0


class RefreshSync:
    def __init__(self, engine: Engine, store: IntegrationStore, settings: RefreshSettings,
                 clock: Callable[[], datetime]) -> None:
        self.engine = engine
        self.store = store
        self.settings = settings
        self.clock = clock
        self.last_sync: datetime | None = None
        self._watermark: datetime | None = None
        self._passes = 0

    async def run_forever(self) -> None:
        while True:
            try:
                report = await self.sync_once()
                if report.added or report.moved or report.dropped:
                    log.info("refresh schedule updated", extra=vars(report))
            except Exception as exc:
                log.warning("refresh discovery failed; retrying next interval",
                            extra={"error": f"{type(exc).__name__}: {exc}"[:300]})
            await asyncio.sleep(self.settings.sync_interval)

    def due_time(self, doc: dict[str, Any], dead_tokens: dict[str, str]) -> datetime | None:
        """When this integration's refresh is due, or None if it must not be refreshed."""
        if doc.get("status") == "revoked" or not doc.get("refreshToken"):
            return None
        if not isinstance(doc.get("tokenExpiresAt"), datetime):
            return None
        integration_id = str(doc["_id"])
        if dead_tokens.get(integration_id) == fingerprint(doc["refreshToken"]):
            return None  # refused for good; waits for the tenant to reconnect
        # A stable spread per integration, so repeated passes do not move the run.
        digest = hashlib.sha256(integration_id.encode()).digest()
        spread = int.from_bytes(digest[:4], "big") / 0xFFFFFFFF * self.settings.jitter
        return as_utc(doc["tokenExpiresAt"]) - timedelta(seconds=self.settings.lead + spread)

    async def sync_once(self, full: bool | None = None) -> SyncReport:
        full = self._passes % FULL_EVERY == 0 if full is None else full
        started = self.clock()
        docs = await self.store.changed_since(None if full else self._watermark)
        dead_tokens = await self.store.states_with_refresh_failure()
        job_ids = None if full else [job_id(str(d["_id"])) for d in docs]
        pending = await self.engine.runs.pending_by_job(QUEUE, job_ids)
        report = SyncReport(full=full, seen=len(docs))
        now = self.clock()
        for doc in docs:
            jid = job_id(str(doc["_id"]))
            due = self.due_time(doc, dead_tokens)
            have = pending.pop(jid, None)
            if due is None:
                if have is not None and await self.engine.cancel(QUEUE, jid):
                    report.dropped += 1
                continue
            if have is not None and (have["state"] == "active"
                                     or _same_time(as_utc(have["runAt"]), due, now)):
                continue
            await self.engine.add(
                QUEUE, {"integrationId": str(doc["_id"]), "tenantId": doc.get("tenantId")},
                job_id=jid, run_at=max(due, now), deadline=as_utc(doc["tokenExpiresAt"]),
                replace=True,
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


def _same_time(have: datetime, want: datetime, now: datetime) -> bool:
    """Already scheduled as wanted: the same time, or both already due."""
    return abs((have - want).total_seconds()) < 0.001 or (have <= now and want <= now)
