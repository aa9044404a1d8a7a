"""Tenant-owner notifications, in `mwapjobs_notifications`: recorded by the jobs that
find something a tenant must know (an integration expired or revoked), delivered by
alerting (`alerts.notifier`).

A notification is `{kind, tenantId, integrationId, providerId, reason, createdAt,
delivered: false}`. A delivery pass claims one due, undelivered notification at a time
by pushing its `nextAttemptAt` forward (so two daemons never deliver the same one at
once), records which channels took it (`deliveredTo`), and finally `delivered: true`.
A channel failure leaves it undelivered with `attempts`, `lastError` and a later
`nextAttemptAt`, so it is retried, also after a restart.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pymongo import ASCENDING, DESCENDING, ReturnDocument

from .mongo import Mongo
from .names import NOTIFICATIONS


class NotificationStore:
    def __init__(self, mongo: Mongo) -> None:
        self._mongo = mongo

    async def ensure_indexes(self) -> None:
        await self._mongo.call(lambda db: db[NOTIFICATIONS].create_index(
            [("createdAt", DESCENDING)], name="mwapjobs_notifications_recent"))
        await self._mongo.call(lambda db: db[NOTIFICATIONS].create_index(
            [("delivered", ASCENDING), ("createdAt", ASCENDING)],
            name="mwapjobs_notifications_pending"))

    async def record(self, kind: str, integration: dict[str, Any], reason: str,
                     now: datetime) -> None:
        """Record a notification about `integration` durably; delivery comes later."""
        doc = {"kind": kind, "tenantId": integration.get("tenantId"),
               "integrationId": str(integration["_id"]),
               "providerId": integration.get("providerId"), "reason": reason,
               "createdAt": now, "delivered": False}
        await self._mongo.call(lambda db: db[NOTIFICATIONS].insert_one(doc))

    async def claim(self, now: datetime, hold_until: datetime) -> dict[str, Any] | None:
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

    async def record_delivery(self, doc_id: Any, delivered_to: list[str], done: bool,
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
