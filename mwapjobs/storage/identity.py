"""Who may do what, read from the MWAP backend's own collections.

Roles are not ours to keep: the backend's `superadmins` and `tenants`
collections are the truth, so we ask them on each request rather than copy
them, and a revoked superadmin or a transferred tenant takes effect at once.
Each question is one indexed `find_one` that returns only `_id`.
"""

from __future__ import annotations

from typing import Any

from bson import ObjectId
from bson.errors import InvalidId

from .mongo import Mongo
from .names import SUPERADMINS, TENANTS

_ID_ONLY = {"_id": 1}


class IdentityStore:
    """Role look-ups for an authenticated user, identified by the JWT `sub`."""

    def __init__(self, mongo: Mongo) -> None:
        self._mongo = mongo

    async def is_superadmin(self, sub: str) -> bool:
        """True when `sub` is listed in `superadmins` (the backend's `{userId: sub}`)."""
        query: dict[str, Any] = {"userId": sub}
        doc = await self._mongo.call(lambda db: db[SUPERADMINS].find_one(query, _ID_ONLY))
        return doc is not None

    async def is_tenant_owner(self, tenant_id: str, sub: str) -> bool:
        """True when `sub` owns tenant `tenant_id`.

        Tenant ids are ObjectIds in MWAP; a string that is not one names no
        tenant, so it answers False instead of raising (the caller then
        answers 403, as for any tenant that is not yours).
        """
        try:
            oid = ObjectId(tenant_id)
        except (InvalidId, TypeError):
            return False
        query: dict[str, Any] = {"_id": oid, "ownerId": sub}
        doc = await self._mongo.call(lambda db: db[TENANTS].find_one(query, _ID_ONLY))
        return doc is not None
