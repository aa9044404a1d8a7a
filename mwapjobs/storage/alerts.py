"""Queries for alerting: cheap, indexed reads of run history, and notification delivery.

Rule checks read `mwapjobs_runs` through the indexes the engine creates
(`mwapjobs_history_order` = queue, state, finishedAt, _id; `mwapjobs_claim` = queue,
state, priority, runAt), so each check costs a few index look-ups whatever
the history size.

Tenant-owner notifications (`mwapjobs_notifications`, written by the token
refresh and health work) are delivered from here: a pass claims one due,
undelivered notification at a time by pushing its `nextAttemptAt` forward
(so two daemons never deliver the same one at once), then records which
channels took it (`deliveredTo`), and finally `delivered: true`. A channel
failure leaves it undelivered with `attempts`, `lastError` and a later
`nextAttemptAt`, so it is retried, also after a restart.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from pymongo import ASCENDING, DESCENDING, ReturnDocument

from .mongo import Mongo
from .names import NOTIFICATIONS, RUNS, SCHEDULER_QUARANTINE


class AlertStore:
    def __init__(self, mongo: Mongo) -> None:
        self._mongo = mongo

    @property
    def mongo(self) -> Mongo:
        """The database, for rules whose state another store owns (provider holds)."""
        return self._mongo

    async def ensure_indexes(self) -> None:
        await self._mongo.call(
            lambda db: db[NOTIFICATIONS].create_index(
                [("delivered", ASCENDING), ("createdAt", ASCENDING)],
                name="mwapjobs_notifications_pending",
            )
        )

    async def quarantined(self) -> tuple[int, datetime | None]:
        """How many scheduler documents are in the quarantine, and when the latest came."""
        count = await self._mongo.call(lambda db: db[SCHEDULER_QUARANTINE].count_documents({}))
        if not count:
            return 0, None
        doc = await self._mongo.call(lambda db: db[SCHEDULER_QUARANTINE].find_one(
            {}, {"quarantinedAt": 1}, sort=[("quarantinedAt", DESCENDING)]))
        when = doc.get("quarantinedAt") if doc else None
        return int(count), _utc(when) if isinstance(when, datetime) else None

    # -- run history (rules) ------------------------------------------------------

    async def count_finished(self, queue: str, state: str, since: datetime) -> int:
        """Runs of `queue` that ended in `state` at or after `since` (index-only count)."""
        query: dict[str, Any] = {"queue": queue, "state": state, "finishedAt": {"$gte": since}}
        n = await self._mongo.call(lambda db: db[RUNS].count_documents(query))
        return int(n)

    async def oldest_waiting(self, queue: str) -> datetime | None:
        """The earliest `runAt` among the waiting runs of `queue`.

        The claim index orders by priority first, so this asks for the
        distinct priorities (a distinct scan), then the oldest run of each
        (one index look-up each); a run starved by higher priorities counts.
        """
        base: dict[str, Any] = {"queue": queue, "state": "waiting"}
        priorities: list[Any] = await self._mongo.call(
            lambda db: db[RUNS].distinct("priority", base)
        )
        oldest: datetime | None = None
        for priority in priorities:
            doc = await self._mongo.call(_oldest({**base, "priority": priority}))
            run_at = doc.get("runAt") if doc else None
            if isinstance(run_at, datetime) and (oldest is None or _utc(run_at) < oldest):
                oldest = _utc(run_at)
        return oldest

    async def last_finished(self, queue: str, state: str) -> datetime | None:
        """When the newest run of `queue` in `state` finished (the history index)."""
        doc: dict[str, Any] | None = await self._mongo.call(
            lambda db: db[RUNS].find_one({"queue": queue, "state": state}, {"finishedAt": 1},
                                         sort=[("finishedAt", DESCENDING)])
        )
        finished = doc.get("finishedAt") if doc else None
        return _utc(finished) if isinstance(finished, datetime) else None

    # -- tenant-owner notifications -------------------------------------------------

    async def claim_notification(self, now: datetime, hold_until: datetime
                                 ) -> dict[str, Any] | None:
        """Take the oldest undelivered notification that is due, holding it until
        `hold_until` (after which another pass, or another daemon, may take it)."""
        query: dict[str, Any] = {
            "delivered": False,
            "$or": [{"nextAttemptAt": None}, {"nextAttemptAt": {"$lte": now}}],
        }
        doc: dict[str, Any] | None = await self._mongo.call(
            lambda db: db[NOTIFICATIONS].find_one_and_update(
                query, {"$set": {"nextAttemptAt": hold_until}},
                sort=[("createdAt", ASCENDING)], return_document=ReturnDocument.AFTER,
            )
        )
        return doc

    async def record_notification(self, doc_id: Any, delivered_to: list[str], done: bool,
                                  now: datetime, error: str | None,
                                  retry_at: datetime | None) -> None:
        """Write the outcome of one delivery attempt."""
        update: dict[str, Any] = {"$addToSet": {"deliveredTo": {"$each": delivered_to}}}
        if done:
            update["$set"] = {"delivered": True, "deliveredAt": now}
            update["$unset"] = {"nextAttemptAt": "", "lastError": ""}
        else:
            update["$set"] = {"nextAttemptAt": retry_at, "lastError": error,
                              "lastAttemptAt": now}
            update["$inc"] = {"attempts": 1}
        if not delivered_to:
            del update["$addToSet"]
        await self._mongo.call(
            lambda db: db[NOTIFICATIONS].update_one({"_id": doc_id, "delivered": False}, update)
        )


def _oldest(query: dict[str, Any]) -> Callable[[Any], Awaitable[dict[str, Any] | None]]:
    return lambda db: db[RUNS].find_one(query, {"runAt": 1}, sort=[("runAt", ASCENDING)])


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)
