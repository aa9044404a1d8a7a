"""The alert history, in `mwapjobs_alert_history`: one document per FIRING or RESOLVED
message the alert manager sent, so that what operators were told survives a restart
(alert *state* lives in memory) and can be archived by upkeep (jobs/maintenance/).

    {_id, at, status: "firing" | "resolved", rule, alert, subject, details, since, repeat}

Written once per evaluation that sent something (one `insert_many`); read by date only
(the `mwapjobs_alert_history_at` index), and trimmed by upkeep past
`maintenance.alert_history_days`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pymongo import ASCENDING

from .mongo import Mongo
from .names import ALERT_HISTORY

# What of a message's event is kept (the webhook's `event` fields, minus the volatile ones).
FIELDS = ("status", "rule", "alert", "subject", "details", "since", "repeat")


class AlertHistoryStore:
    def __init__(self, mongo: Mongo) -> None:
        self._mongo = mongo
        self._indexed = False

    async def ensure_indexes(self) -> None:
        await self._mongo.call(lambda db: db[ALERT_HISTORY].create_index(
            [("at", ASCENDING)], name="mwapjobs_alert_history_at"))
        self._indexed = True

    async def record(self, events: list[dict[str, Any]], at: datetime) -> None:
        """Keep these alert events (already scrubbed: they are what the channels got)."""
        if not events:
            return
        if not self._indexed:
            await self.ensure_indexes()
        docs = [{"at": at, **{k: e.get(k) for k in FIELDS if e.get(k) is not None}}
                for e in events]
        await self._mongo.call(lambda db: db[ALERT_HISTORY].insert_many(docs))

    async def recent(self, limit: int = 20) -> list[dict[str, Any]]:
        docs: list[dict[str, Any]] = await self._mongo.call(
            lambda db: db[ALERT_HISTORY].find({}, {"_id": 0}).sort("at", -1).limit(limit)
            .to_list(limit))
        return docs
