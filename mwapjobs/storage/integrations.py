"""Queries on the MWAP backend's integrations and providers, and on our own per-integration state.

The backend owns `cloudProviderIntegrations` and `cloudProviders`; we read them
and write back only what a token refresh or health check changes, always with
a filter that repeats what we read, so a concurrent change by the backend (a
tenant reconnecting) wins. Our own notes about an integration (a permanent
refresh failure, health history) live in `mwapjobs_integrations`, never in
the backend's documents.
"""

from __future__ import annotations

import contextlib
from datetime import datetime
from typing import Any

from bson import ObjectId
from bson.errors import InvalidId
from pymongo import ASCENDING, DESCENDING, ReturnDocument

from .mongo import INTEGRATIONS, PROVIDERS, Mongo

INTEGRATION_STATE = "mwapjobs_integrations"
NOTIFICATIONS = "mwapjobs_notifications"

# What discovery needs from an integration; never the access token.
SYNC_FIELDS = {"_id": 1, "tenantId": 1, "providerId": 1, "status": 1, "tokenExpiresAt": 1,
               "updatedAt": 1, "refreshToken": 1}


def id_variants(integration_id: str) -> list[Any]:
    """The backend stores `_id` as a hex string, older documents as an ObjectId: match both."""
    variants: list[Any] = [integration_id]
    with contextlib.suppress(InvalidId, TypeError):
        variants.append(ObjectId(integration_id))
    return variants


class IntegrationStore:
    def __init__(self, mongo: Mongo) -> None:
        self._mongo = mongo

    async def ensure_indexes(self) -> None:
        """Our own indexes on the backend's collection (it has none), named as ours."""
        await self._mongo.call(
            lambda db: db[INTEGRATIONS].create_index(
                [("updatedAt", ASCENDING)], name="mwapjobs_updatedAt"
            )
        )
        await self._mongo.call(
            lambda db: db[NOTIFICATIONS].create_index(
                [("createdAt", DESCENDING)], name="mwapjobs_notifications_recent"
            )
        )

    # -- integrations -------------------------------------------------------

    async def get(self, integration_id: str) -> dict[str, Any] | None:
        doc: dict[str, Any] | None = await self._mongo.call(
            lambda db: db[INTEGRATIONS].find_one({"_id": {"$in": id_variants(integration_id)}})
        )
        return doc

    async def changed_since(self, since: datetime | None) -> list[dict[str, Any]]:
        """Integrations updated at or after `since` (all when None), by the updatedAt index."""
        query = {} if since is None else {"updatedAt": {"$gte": since}}
        docs: list[dict[str, Any]] = await self._mongo.call(
            lambda db: db[INTEGRATIONS].find(query, SYNC_FIELDS).to_list(None)
        )
        return docs

    async def save_tokens(self, current: dict[str, Any], fields: dict[str, Any]) -> bool:
        """Write refreshed tokens unless the backend changed the tokens meanwhile.

        The filter repeats the token values we read: a tenant who reconnected
        while our request was in flight has newer tokens, and they win.
        """
        result = await self._mongo.call(
            lambda db: db[INTEGRATIONS].update_one(
                {"_id": current["_id"], "refreshToken": current.get("refreshToken"),
                 "accessToken": current.get("accessToken"), "status": {"$ne": "revoked"}},
                {"$set": fields},
            )
        )
        return bool(result.modified_count)

    async def set_status(self, current: dict[str, Any], status: str, now: datetime,
                         only_from: tuple[str, ...] | None = None) -> bool:
        """Change the status unless the tokens changed meanwhile; never touch a revoked one."""
        allowed: dict[str, Any] = {"$ne": "revoked"} if only_from is None else {
            "$in": [s for s in only_from if s != "revoked"]}
        result = await self._mongo.call(
            lambda db: db[INTEGRATIONS].update_one(
                {"_id": current["_id"], "refreshToken": current.get("refreshToken"),
                 "accessToken": current.get("accessToken"), "status": allowed},
                {"$set": {"status": status, "updatedAt": now}},
            )
        )
        return bool(result.modified_count)

    # -- providers -----------------------------------------------------------

    async def provider(self, provider_id: str) -> dict[str, Any] | None:
        try:
            oid = ObjectId(provider_id)
        except (InvalidId, TypeError):
            return None
        doc: dict[str, Any] | None = await self._mongo.call(
            lambda db: db[PROVIDERS].find_one({"_id": oid})
        )
        return doc

    # -- our own state per integration ------------------------------------------

    async def state(self, integration_id: str) -> dict[str, Any] | None:
        doc: dict[str, Any] | None = await self._mongo.call(
            lambda db: db[INTEGRATION_STATE].find_one({"_id": integration_id})
        )
        return doc

    async def states_with_refresh_failure(self) -> dict[str, str]:
        """integrationId → fingerprint of the refresh token that failed for good."""
        docs = await self._mongo.call(
            lambda db: db[INTEGRATION_STATE]
            .find({"refreshFailure": {"$exists": True}}, {"refreshFailure.token": 1})
            .to_list(None)
        )
        return {d["_id"]: d["refreshFailure"]["token"] for d in docs}

    async def record_refresh_failure(self, integration_id: str, token_fingerprint: str,
                                     reason: str, now: datetime) -> None:
        """Remember a dead refresh token, so discovery stops retrying it until the tenant
        reconnects (which changes the token)."""
        await self._mongo.call(
            lambda db: db[INTEGRATION_STATE].update_one(
                {"_id": integration_id},
                {"$set": {"refreshFailure": {"token": token_fingerprint, "reason": reason,
                                             "at": now}}},
                upsert=True,
            )
        )

    async def clear_refresh_failure(self, integration_id: str) -> None:
        await self._mongo.call(
            lambda db: db[INTEGRATION_STATE].update_one(
                {"_id": integration_id}, {"$unset": {"refreshFailure": ""}}
            )
        )

    async def update_state(self, integration_id: str, update: dict[str, Any]) -> dict[str, Any]:
        doc: dict[str, Any] = await self._mongo.call(
            lambda db: db[INTEGRATION_STATE].find_one_and_update(
                {"_id": integration_id}, update, upsert=True,
                return_document=ReturnDocument.AFTER,
            )
        )
        return doc

    # -- notifications ------------------------------------------------------------

    async def notify(self, kind: str, integration: dict[str, Any], reason: str,
                     now: datetime) -> None:
        """Record a tenant-owner notification durably; delivery is the alerting's job."""
        doc = {"kind": kind, "tenantId": integration.get("tenantId"),
               "integrationId": str(integration["_id"]),
               "providerId": integration.get("providerId"), "reason": reason,
               "createdAt": now, "delivered": False}
        await self._mongo.call(lambda db: db[NOTIFICATIONS].insert_one(doc))
