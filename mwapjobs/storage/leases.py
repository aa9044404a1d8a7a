"""Leases on MongoDB documents, ShedLock style: who holds a named lock, until when,
and a fence that grows with each new holder.

    {_id: "leader", lockedBy: "host:pid:boot:nonce", lockedAt, lockUntil, fence: 7}

Taking a lease is one `find_one_and_update` on `{_id, lockUntil <= now}` with upsert: if
the lease is held, the filter matches nothing, the upsert inserts a second document with
the same `_id`, and the server refuses it (`DuplicateKeyError`): "held". Renewing is owner-
and fence-checked, so a holder that lost its lease (paused past `lockUntil` while another
took over) cannot extend the new holder's lease. The times are this process's clock: the
instances of one deployment run on NTP-synchronised VMs, and the holder also stops
acting on its own monotonic clock before the lease runs out (`leadership.py`).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError

from .mongo import Mongo
from .names import LEASES

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class LeaseStore:
    def __init__(self, mongo: Mongo) -> None:
        self._mongo = mongo

    async def acquire(self, name: str, owner: str, now: datetime, ttl: float) -> int | None:
        """Take the lease if it is free (or expired); its new fence, or None if held."""
        update = {"$set": {"lockedBy": owner, "lockedAt": now,
                           "lockUntil": now + timedelta(seconds=ttl)},
                  "$inc": {"fence": 1}}
        try:
            doc: dict[str, Any] | None = await self._mongo.call(
                lambda db: db[LEASES].find_one_and_update(
                    {"_id": name, "lockUntil": {"$lte": now}}, update, upsert=True,
                    return_document=ReturnDocument.AFTER))
        except DuplicateKeyError:
            return None
        return int(doc["fence"]) if doc else None

    async def renew(self, name: str, owner: str, fence: int, now: datetime,
                    ttl: float) -> bool:
        """Extend our lease; False if it is not ours any more (another holder took it)."""
        result = await self._mongo.call(lambda db: db[LEASES].update_one(
            {"_id": name, "lockedBy": owner, "fence": fence},
            {"$set": {"lockUntil": now + timedelta(seconds=ttl)}}))
        return bool(result.matched_count)

    async def release(self, name: str, owner: str, fence: int) -> None:
        """Give the lease up now (a graceful stop): the next instance need not wait."""
        await self._mongo.call(lambda db: db[LEASES].update_one(
            {"_id": name, "lockedBy": owner, "fence": fence},
            {"$set": {"lockUntil": EPOCH}}))

    async def holder(self, name: str) -> dict[str, Any] | None:
        """The lease document: `lockedBy`, `lockUntil`, `fence` (None if never taken)."""
        doc: dict[str, Any] | None = await self._mongo.call(
            lambda db: db[LEASES].find_one({"_id": name}))
        return doc
