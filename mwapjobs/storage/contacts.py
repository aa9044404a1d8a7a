"""Tenant owners' contacts: what Auth0 said about an owner, kept in
`mwapjobs_owner_contacts` until it expires, so that an owner's address costs one
Management API call a day, not one per email (the API is rate-limited).

    {_id: <Auth0 sub>, found: true, email, name, fetchedAt, expiresAt}
    {_id: <Auth0 sub>, found: false, reason, fetchedAt, expiresAt}   # no address to use

The address is kept because the mail has to go to it; it is never logged or shown in
full (the API and the dashboard show it masked). A TTL index removes expired documents;
reads check `expiresAt` themselves (a TTL monitor runs once a minute at best).
"""

from __future__ import annotations

import contextlib
from datetime import datetime
from typing import Any

from bson import ObjectId
from bson.errors import InvalidId
from pymongo import ASCENDING

from .mongo import Mongo
from .names import OWNER_CONTACTS, TENANTS


class ContactStore:
    def __init__(self, mongo: Mongo) -> None:
        self._mongo = mongo

    async def ensure_indexes(self) -> None:
        await self._mongo.call(lambda db: db[OWNER_CONTACTS].create_index(
            [("expiresAt", ASCENDING)], name="mwapjobs_owner_contacts_ttl",
            expireAfterSeconds=0))

    async def tenant(self, tenant_id: str) -> dict[str, Any] | None:
        """The backend's tenant (`_id` an ObjectId): its `name` and `ownerId` only."""
        oid: Any = tenant_id
        with contextlib.suppress(InvalidId, TypeError):
            oid = ObjectId(tenant_id)
        doc: dict[str, Any] | None = await self._mongo.call(
            lambda db: db[TENANTS].find_one({"_id": oid}, {"name": 1, "ownerId": 1}))
        return doc

    async def get(self, sub: str, now: datetime) -> dict[str, Any] | None:
        """What we know of `sub` and has not expired, else None."""
        doc: dict[str, Any] | None = await self._mongo.call(
            lambda db: db[OWNER_CONTACTS].find_one({"_id": sub, "expiresAt": {"$gt": now}}))
        return doc

    async def found(self, sub: str, email: str, name: str | None, now: datetime,
                    expires: datetime) -> None:
        await self._put(sub, {"found": True, "email": email, "name": name, "fetchedAt": now,
                              "expiresAt": expires})

    async def unusable(self, sub: str, reason: str, now: datetime, expires: datetime) -> None:
        await self._put(sub, {"found": False, "reason": reason, "fetchedAt": now,
                              "expiresAt": expires})

    async def _put(self, sub: str, fields: dict[str, Any]) -> None:
        await self._mongo.call(lambda db: db[OWNER_CONTACTS].replace_one(
            {"_id": sub}, {"_id": sub, **fields}, upsert=True))

    async def counts(self, now: datetime) -> dict[str, int]:
        async def count(query: dict[str, Any]) -> int:
            return int(await self._mongo.call(
                lambda db: db[OWNER_CONTACTS].count_documents(query)))

        live = {"expiresAt": {"$gt": now}}
        return {"addresses": await count({**live, "found": True}),
                "unusable": await count({**live, "found": False})}
