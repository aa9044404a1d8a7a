"""The `maintenance` queue: one upkeep run a day (`maintenance.cron`), in this order:

1. **Expired OAuth flows.** An integration whose flow expired while `initiated` or
   `exchanging` still holds an encrypted PKCE verifier: it is reset as the backend's
   reset endpoint does it (`MaintenanceStore.reset_flow`), conditionally, with an audit
   line per integration.
2. **The database report** (`report.py`): indexes, orphans, sizes. It never deletes.
3. **History past its retention**, oldest first: mwapjobs' finished runs (each queue's
   `keep_completed`/`keep_failed`, only while archiving: without an archive the engine
   trims them itself), delivered notifications, the alert history, health-history
   entries, and the backend's audit log when that collection exists. With
   `maintenance.archive_dir` each chunk is written to the archive (archive.py) before
   it is deleted; without, it is deleted only. Then the archive is rotated.

Work is bounded: reads of at most `ARCHIVE_CHUNK` documents, deletes of `batch_size`
ids, and a time budget (`maintenance.time_budget`) checked between batches; what is
left waits for the next run (the report says `budgetExhausted`). File work runs in a
thread; nothing here holds the event loop or a database lock for long.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from ...config import MaintenanceSettings
from ...engine import Engine
from ...logs import audit
from ...queues import Job
from ...storage.maintenance import Cutoff, HistorySource, MaintenanceStore
from ...storage.names import ALERT_HISTORY, INTEGRATION_STATE, NOTIFICATIONS, RUNS
from .archive import Archive
from .decide import effective_cutoff
from .report import DatabaseReport

log = logging.getLogger(__name__)

QUEUE = "maintenance"
JOB_ID = "daily"
ACTOR = "mwapjobs:maintenance"
CHUNK_BATCHES = 20  # documents archived per file write: this many delete batches
HEALTH_FOLDER = f"{INTEGRATION_STATE}.health.history"


class Budget:
    """The run's time budget, checked between batches."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.exhausted = False

    def left(self) -> bool:
        if time.monotonic() >= self.deadline:
            self.exhausted = True
        return not self.exhausted


@dataclass
class Rule:
    """One source of history with its cutoff, and what to tell when documents go."""

    source: HistorySource
    cutoff: Cutoff | None
    deleted: Callable[[int], None] | None = None


class Upkeep:
    """The job handler."""

    def __init__(self, store: MaintenanceStore, settings: MaintenanceSettings, engine: Engine,
                 clock: Callable[[], datetime], report: DatabaseReport) -> None:
        self.store = store
        self.settings = settings
        self.engine = engine
        self.clock = clock
        self.report_maker = report
        self.archive = Archive(settings.archive_dir) if settings.archive_dir else None
        self.last: dict[str, Any] | None = None  # the last report made by this process
        self._said_no_audit = False

    def register(self, engine: Engine) -> None:
        """One run at a time, never retried (tomorrow's run is the retry); its timeout
        leaves room for the report after the budget."""
        engine.registry.register(QUEUE, self, attempts=1, concurrency=1,
                                 timeout=self.settings.time_budget + 900.0)
        if self.archive is not None:  # finished runs must be archived before they go
            engine.hand_over_retention(QUEUE)

    async def __call__(self, job: Job) -> dict[str, Any]:
        report = await self.run(job.run_id)
        return summary(report)

    async def run(self, run_id: str | None = None) -> dict[str, Any]:
        started = time.monotonic()
        now = self.clock()
        budget = Budget(self.settings.time_budget)
        log.info("maintenance started", extra={"runId": run_id})
        flows = (await self.reset_flows(budget, now) if self.settings.reset_expired_flows
                 else {"enabled": False})
        database = await self.report_maker.make()
        retention, archive = await self.retention(budget, now)
        report = {"runId": run_id, "startedAt": now, "finishedAt": self.clock(),
                  "seconds": round(time.monotonic() - started, 3),
                  "budgetExhausted": budget.exhausted, "flows": flows,
                  "retention": retention, "archive": archive, **database}
        await self.store.save_report(report)
        self.last = report
        log.info("maintenance finished", extra={"runId": run_id, **summary(report)})
        return report

    # -- 1. expired OAuth flows ----------------------------------------------------------

    async def reset_flows(self, budget: Budget, now: datetime) -> dict[str, Any]:
        found = reset = changed = 0
        batch = self.settings.batch_size
        seen: set[str] = set()
        while budget.left():
            docs = [d for d in await self.store.expired_flows(now, batch)
                    if str(d["_id"]) not in seen]
            for doc in docs:
                seen.add(str(doc["_id"]))
                found += 1
                oauth = doc.get("oauth") or {}
                if not await self.store.reset_flow(doc, now):
                    changed += 1  # a new flow started, or the backend reset it meanwhile
                    continue
                reset += 1
                audit("oauth.flow.reset-expired", ACTOR, f"integration:{doc['_id']}",
                      tenantId=doc.get("tenantId"), providerId=doc.get("providerId"),
                      flowStatus=oauth.get("status"), expiredAt=oauth.get("expiresAt"))
            if len(docs) < batch:
                break
        if reset:
            log.info("expired OAuth flows reset", extra={"reset": reset, "found": found})
        return {"enabled": True, "found": found, "reset": reset, "changedMeanwhile": changed}

    # -- 3. history past its retention -------------------------------------------------------

    async def rules(self, now: datetime) -> list[Rule]:
        s = self.settings
        out: list[Rule] = []
        if self.archive is not None:
            for queue in self.engine.registry:
                for state, keep in (("completed", queue.options.keep_completed),
                                    ("failed", queue.options.keep_failed)):
                    age = now - timedelta(seconds=keep.age) if keep.age is not None else None
                    count = (await self.store.count_boundary(queue.name, state, keep.count)
                             if keep.count is not None else None)
                    out.append(Rule(
                        HistorySource(RUNS, RUNS, "finishedAt",
                                      {"queue": queue.name, "state": state}),
                        effective_cutoff(age, count), _counter(self.engine, queue.name, state)))
        out.append(Rule(HistorySource(NOTIFICATIONS, NOTIFICATIONS, "createdAt",
                                      {"delivered": True}),
                        Cutoff(now - timedelta(days=s.notifications_days))))
        out.append(Rule(HistorySource(ALERT_HISTORY, ALERT_HISTORY, "at"),
                        Cutoff(now - timedelta(days=s.alert_history_days))))
        return out

    async def retention(self, budget: Budget,
                        now: datetime) -> tuple[dict[str, Any], dict[str, Any] | None]:
        today = now.date()
        problem = None
        if self.archive is not None:
            problem = await asyncio.to_thread(self.archive.check)
            if problem is not None:
                log.error("maintenance: the archive directory cannot be written; nothing "
                          "that is archived first is deleted",
                          extra={"archiveDir": self.settings.archive_dir, "error": problem})
                return {}, {"dir": self.settings.archive_dir, "error": problem}
        totals: dict[str, dict[str, Any]] = {}
        for rule in [*await self.rules(now), *await self._audit_rule(now)]:
            if rule.cutoff is None:
                continue
            got = await self._drain(rule, budget, today)
            into = totals.setdefault(rule.source.folder, {"archived": 0, "deleted": 0,
                                                          "more": False})
            for key in ("archived", "deleted"):
                into[key] += got[key]
            into["more"] = into["more"] or got["more"]
        totals[HEALTH_FOLDER] = await self._health(
            now - timedelta(days=self.settings.health_history_days), budget, today)
        archive = None
        if self.archive is not None:
            rotated: list[str] = []
            for folder in sorted(totals):
                rotated += await asyncio.to_thread(
                    self.archive.rotate, folder, today, self.settings.archive_keep_files,
                    self.settings.archive_keep_days)
            archive = {"dir": self.settings.archive_dir, "rotated": rotated,
                       "folders": await asyncio.to_thread(self.archive.summary, sorted(totals))}
        return totals, archive

    async def _audit_rule(self, now: datetime) -> list[Rule]:
        name = self.settings.audit_collection
        if not await self.store.collection_exists(name):
            if not self._said_no_audit:
                log.info("maintenance: no backend audit log to keep (collection absent)",
                         extra={"collection": name})
                self._said_no_audit = True
            return []
        return [Rule(HistorySource(name, name, "timestamp", string_dates=True),
                     Cutoff(now - timedelta(days=self.settings.audit_days)))]

    async def _drain(self, rule: Rule, budget: Budget, today: Any) -> dict[str, Any]:
        """Archive (when on) and delete `rule`'s documents past its cutoff, oldest first."""
        assert rule.cutoff is not None
        batch = self.settings.batch_size
        chunk = batch * CHUNK_BATCHES if self.archive is not None else batch
        archived = deleted = 0
        more = False
        while True:
            if not budget.left():
                more = True
                break
            docs = await self.store.oldest(rule.source, rule.cutoff, chunk)
            if not docs:
                break
            if self.archive is not None:
                await asyncio.to_thread(self.archive.write, rule.source.folder, docs,
                                        rule.source.date_field, today)
                archived += len(docs)
            gone = 0
            for start in range(0, len(docs), batch):
                ids = [d["_id"] for d in docs[start:start + batch]]
                gone += await self.store.delete(rule.source, ids, rule.cutoff)
            deleted += gone
            if rule.deleted is not None and gone:
                rule.deleted(gone)
            if len(docs) < chunk:
                break
            if gone == 0:  # what we read will not go (changed meanwhile): stop here
                more = True
                break
        return {"archived": archived, "deleted": deleted, "more": more}

    async def _health(self, before: datetime, budget: Budget, today: Any) -> dict[str, Any]:
        """Health-history entries older than `before`, in our notes per integration."""
        batch = self.settings.batch_size
        archived = removed = 0
        after: str | None = None
        more = False
        while True:
            if not budget.left():
                more = True
                break
            docs = await self.store.old_health_entries(before, batch, after)
            if not docs:
                break
            entries = [{"integrationId": str(d["_id"]),
                        "tenantId": (d.get("health") or {}).get("tenantId"),
                        "providerId": (d.get("health") or {}).get("providerId"), **entry}
                       for d in docs for entry in (d.get("health") or {}).get("history") or []
                       if isinstance(entry, dict) and _before(entry.get("at"), before)]
            if self.archive is not None and entries:
                await asyncio.to_thread(self.archive.write, HEALTH_FOLDER, entries, "at", today)
                archived += len(entries)
            await self.store.pull_health_entries([d["_id"] for d in docs], before)
            removed += len(entries)
            after = str(docs[-1]["_id"])
            if len(docs) < batch:
                break
        return {"archived": archived, "deleted": removed, "more": more}


def _before(value: Any, before: datetime) -> bool:
    if not isinstance(value, datetime):
        return False
    stamp = value if value.tzinfo else value.replace(tzinfo=before.tzinfo)
    return stamp < before


def _counter(engine: Engine, queue: str, state: str) -> Callable[[int], None]:
    """Keep the engine's finished counters right when we delete its runs."""
    return lambda n: engine.count_finished(queue, state, -n)


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """What the run's result keeps (small: the whole report is in `mwapjobs_maintenance`,
    served by GET /api/v1/maintenance/report)."""
    retention = report.get("retention") or {}
    indexes = report.get("indexes") or []
    orphans = report.get("orphans") or {}
    return {
        "flowsReset": (report.get("flows") or {}).get("reset", 0),
        "archived": sum(int(v.get("archived", 0)) for v in retention.values()),
        "deleted": sum(int(v.get("deleted", 0)) for v in retention.values()),
        "missingIndexes": sum(1 for i in indexes if not i.get("present")),
        "orphans": {k: int(v.get("count", 0)) for k, v in orphans.items()
                    if isinstance(v, dict)},
        "budgetExhausted": bool(report.get("budgetExhausted")),
        "archiveError": (report.get("archive") or {}).get("error"),
        "seconds": report.get("seconds"),
    }


async def ensure_all(steps: Sequence[Callable[[], Awaitable[None]]]) -> None:
    for step in steps:
        await step()
