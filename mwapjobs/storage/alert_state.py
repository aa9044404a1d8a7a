"""What operators were told about each alert, in `mwapjobs_alerts`, so that the next
leader carries on where the last one stopped (no second FIRING for an alert already
announced, a RESOLVED for one that clears after the handover).

    {_id: "failed_runs|queue demo", rule, label, details, since, active, announced,
     lastSentAt}
"""

from __future__ import annotations

from typing import Any

from .mongo import Mongo
from .names import ALERT_STATE


class AlertStateStore:
    def __init__(self, mongo: Mongo) -> None:
        self._mongo = mongo

    async def load(self) -> dict[str, dict[str, Any]]:
        docs: list[dict[str, Any]] = await self._mongo.call(
            lambda db: db[ALERT_STATE].find({}).to_list(None))
        return {str(d.pop("_id")): d for d in docs}

    async def save(self, key: str, state: dict[str, Any]) -> None:
        await self._mongo.call(lambda db: db[ALERT_STATE].replace_one(
            {"_id": key}, {"_id": key, **state}, upsert=True))

    async def drop(self, key: str) -> None:
        await self._mongo.call(lambda db: db[ALERT_STATE].delete_one({"_id": key}))
