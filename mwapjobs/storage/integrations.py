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
import time
from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

from bson import ObjectId
from bson.errors import InvalidId
from pymongo import ASCENDING
from pymongo.errors import BulkWriteError

from .mongo import Mongo
from .names import INTEGRATION_STATE, INTEGRATIONS, PROVIDERS
from .notifications import NotificationStore
from .providers import ProviderHolds

# Seconds a provider document is reused by the refresher: an operator's change to one
# (a rotated secret, a new URL) is seen within this long, or at once by discovery.
PROVIDER_CACHE_SECONDS = 30.0

# What discovery needs from an integration; never the access token.
SYNC_FIELDS = {"_id": 1, "tenantId": 1, "providerId": 1, "status": 1, "tokenExpiresAt": 1,
               "updatedAt": 1, "refreshToken": 1}
# What a health probe needs: the (encrypted) tokens too, for the probe and for the
# conditional status writes that repeat them.
HEALTH_FIELDS = {"_id": 1, "tenantId": 1, "providerId": 1, "status": 1, "tokenExpiresAt": 1,
                 "accessToken": 1, "refreshToken": 1}
OVERVIEW_FIELDS = {"_id": 1, "tenantId": 1, "providerId": 1, "status": 1, "tokenExpiresAt": 1}


def id_variants(integration_id: str) -> list[Any]:
    """The backend stores `_id` as a hex string, older documents as an ObjectId: match both."""
    variants: list[Any] = [integration_id]
    with contextlib.suppress(InvalidId, TypeError):
        variants.append(ObjectId(integration_id))
    return variants


class IntegrationStore:
    def __init__(self, mongo: Mongo, *, provider_cache_seconds: float = PROVIDER_CACHE_SECONDS
                 ) -> None:
        self._mongo = mongo
        # Provider holds (storage/providers.py), shared by the refresher, discovery and
        # the health checks of this process, so they share its short read cache.
        self.holds = ProviderHolds(mongo)
        self.notifications = NotificationStore(mongo)  # what a tenant owner must be told
        self._provider_cache_seconds = provider_cache_seconds
        self._providers: dict[str, tuple[float, dict[str, Any] | None]] = {}

    async def ensure_indexes(self) -> None:
        """Our own indexes on the backend's collection (it has none), named as ours."""
        await self.holds.ensure_indexes()
        await self._mongo.call(
            lambda db: db[INTEGRATIONS].create_index(
                [("updatedAt", ASCENDING)], name="mwapjobs_updatedAt"
            )
        )
        await self.notifications.ensure_indexes()

    # -- integrations -------------------------------------------------------

    async def get(self, integration_id: str) -> dict[str, Any] | None:
        """By the string `_id` the backend writes, then as an ObjectId (older documents).

        Two plain equality lookups rather than one `$in`: the common case stays one
        query, and the embedded store answers equality several times faster."""
        for variant in id_variants(integration_id):
            doc = await self._find_by_id(variant)
            if doc is not None:
                return doc
        return None

    async def _find_by_id(self, value: Any) -> dict[str, Any] | None:
        doc: dict[str, Any] | None = await self._mongo.call(
            lambda db: db[INTEGRATIONS].find_one({"_id": value})
        )
        return doc

    async def changed_since(self, since: datetime | None) -> list[dict[str, Any]]:
        """Integrations updated at or after `since` (all when None), by the updatedAt index."""
        query = {} if since is None else {"updatedAt": {"$gte": since}}
        docs: list[dict[str, Any]] = await self._mongo.call(
            lambda db: db[INTEGRATIONS].find(query, SYNC_FIELDS).to_list(None)
        )
        return docs

    async def by_ids(self, keys: Sequence[Any]) -> list[dict[str, Any]]:
        """These integrations (by `_id` exactly as stored: a change event's documentKey),
        with what discovery reads; those that no longer exist are missing."""
        if not keys:
            return []
        docs: list[dict[str, Any]] = await self._mongo.call(
            lambda db: db[INTEGRATIONS].find({"_id": {"$in": list(keys)}}, SYNC_FIELDS)
            .to_list(None)
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

    async def count_by_status(self) -> dict[str, int]:
        """How many integrations have each status (none set counts as "unknown"), for /metrics."""
        docs = await self._mongo.call(
            lambda db: db[INTEGRATIONS]
            .aggregate([{"$group": {"_id": "$status", "count": {"$sum": 1}}}])
            .to_list(None)
        )
        return {("unknown" if d["_id"] is None else str(d["_id"])): int(d["count"]) for d in docs}

    # -- providers -----------------------------------------------------------

    async def provider(self, provider_id: str, *, fresh: bool = False) -> dict[str, Any] | None:
        """A provider document, read at most every PROVIDER_CACHE_SECONDS (a refresh per
        tenant would otherwise re-read the same few documents); `fresh` reads it now."""
        now = time.monotonic()
        cached = self._providers.get(provider_id)
        if not fresh and cached is not None and now - cached[0] < self._provider_cache_seconds:
            return cached[1]
        try:
            oid = ObjectId(provider_id)
        except (InvalidId, TypeError):
            return None
        doc: dict[str, Any] | None = await self._mongo.call(
            lambda db: db[PROVIDERS].find_one({"_id": oid})
        )
        if len(self._providers) > 10_000:
            self._providers.clear()
        self._providers[provider_id] = (now, doc)
        return doc

    def forget_provider(self, provider_id: str) -> None:
        """The provider changed: the next `provider()` reads it again."""
        self._providers.pop(provider_id, None)

    # -- our own state per integration ------------------------------------------

    async def clear_refresh_failure(self, integration_id: str) -> None:
        await self._mongo.call(
            lambda db: db[INTEGRATION_STATE].update_one(
                {"_id": integration_id}, {"$unset": {"refreshFailure": ""}}
            )
        )

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

    # -- health checks (jobs/health/) ------------------------------------------

    async def connected_integrations(self) -> list[dict[str, Any]]:
        """Every integration a health sweep probes (an access token, not revoked), in one
        query. The encrypted tokens come along, so a sweep that probes at once reads nothing
        per integration; they are decrypted one at a time, just before each probe."""
        query = {"accessToken": {"$nin": [None, ""]}, "status": {"$ne": "revoked"}}
        docs: list[dict[str, Any]] = await self._mongo.call(
            lambda db: db[INTEGRATIONS].find(query, HEALTH_FIELDS).to_list(None)
        )
        return docs

    async def integrations_overview(self) -> list[dict[str, Any]]:
        """Every integration without its tokens, each with `connected` (has an access token)."""
        docs: list[dict[str, Any]] = await self._mongo.call(
            lambda db: db[INTEGRATIONS].find({}, OVERVIEW_FIELDS).to_list(None)
        )
        connected = await self._mongo.call(
            lambda db: db[INTEGRATIONS]
            .find({"accessToken": {"$nin": [None, ""]}}, {"_id": 1})
            .to_list(None)
        )
        ids = {str(d["_id"]) for d in connected}
        for doc in docs:
            doc["connected"] = str(doc["_id"]) in ids
        return docs

    async def providers_by_id(self, only: Collection[str] | None = None
                              ) -> dict[str, dict[str, Any]]:
        """Every provider (of the hex ids `only`, when given) by hex id, without its
        client secret."""
        query: dict[str, Any] = {}
        if only is not None:
            query = {"_id": {"$in": [v for i in only for v in id_variants(i)]}}
        docs = await self._mongo.call(
            lambda db: db[PROVIDERS].find(query, {"clientSecret": 0}).to_list(None)
        )
        return {str(d["_id"]): d for d in docs}

    async def health_states(self) -> dict[str, dict[str, Any]]:
        """What a sweep needs from our own notes, for every integration: the failure streak,
        the status a health check set, the last good and bad check, and a refresh token
        known to be dead."""
        docs = await self._mongo.call(
            lambda db: db[INTEGRATION_STATE]
            .find({}, {"health.consecutiveFailures": 1, "health.setStatus": 1,
                       "health.lastHealthyAt": 1, "health.lastFailureAt": 1,
                       "refreshFailure.token": 1})
            .to_list(None)
        )
        return {str(d["_id"]): d for d in docs}

    async def health_overview(self) -> dict[str, dict[str, Any]]:
        """The current health of every checked integration, without the history."""
        docs = await self._mongo.call(
            lambda db: db[INTEGRATION_STATE]
            .find({"health": {"$exists": True}}, {"health.history": 0})
            .to_list(None)
        )
        return {str(d["_id"]): d["health"] for d in docs if isinstance(d.get("health"), dict)}

    async def health_histories(self, integration_ids: list[str]) -> dict[str, list[Any]]:
        """The health history (oldest first) of these integrations, in one query by id:
        for a page of the health summary, never for every integration."""
        if not integration_ids:
            return {}
        docs = await self._mongo.call(
            lambda db: db[INTEGRATION_STATE]
            .find({"_id": {"$in": list(integration_ids)}}, {"health.history": 1})
            .to_list(None)
        )
        return {str(d["_id"]): list((d.get("health") or {}).get("history") or [])
                for d in docs}

    async def create_health_states(self, integration_ids: list[str]) -> None:
        """Make our notes exist for these integrations (`record_health` never inserts).
        One query; a document another writer made meanwhile is left as it is."""
        if not integration_ids:
            return
        docs = [{"_id": i, "health": {"consecutiveFailures": 0, "history": []}}
                for i in integration_ids]
        with contextlib.suppress(BulkWriteError):
            await self._mongo.call(
                lambda db: db[INTEGRATION_STATE].insert_many(docs, ordered=False)
            )

    async def record_health(self, results: list[tuple[str, dict[str, Any]]],
                            history_size: int) -> int:
        """Record the outcome of several checks in one update; returns how many changed.

        Each result is `(integrationId, r)`; `r["entry"]` is pushed onto the history
        (which keeps its last `history_size` entries) and `r`'s other fields replace
        the stored ones: `at` (→ `lastCheckedAt`, and `entry` → `lastResult`),
        `consecutiveFailures`, `setStatus`, `lastHealthyAt`, `lastFailureAt`,
        `tenantId`, `providerId`. The documents must exist (`create_health_states`).

        Every document gets its own values in one round trip: the filter is the id
        range of the batch, and a binary decision tree on `_id` inside a pipeline
        update hands each document its result (documents of the range that are not
        in the batch get none and stay as they are). That is O(log n) per document,
        works on MongoDB >= 4.2 and on the embedded store (which has neither a
        working `bulk_write` nor `$indexOfArray`), and scans a collection once per
        batch instead of once per integration. Callers keep batches dense in id
        order, so that ranges stay tight.
        """
        if not results:
            return 0
        ordered = sorted(results, key=lambda r: r[0])
        first, last = ordered[0][0], ordered[-1][0]
        query: dict[str, Any] = {"_id": first} if first == last else {
            "_id": {"$gte": first, "$lte": last}}
        fields = ("consecutiveFailures", "setStatus", "lastHealthyAt", "lastFailureAt",
                  "tenantId", "providerId")
        new_health = {
            **{name: f"$$r.{name}" for name in fields},
            "lastCheckedAt": "$$r.at",
            "lastResult": "$$r.entry",
            "history": {"$slice": [
                {"$concatArrays": [{"$ifNull": ["$health.history", []]}, "$$r.push"]},
                -history_size]},
        }
        pipeline = [{"$set": {"health": {"$let": {
            "vars": {"r": _decision_tree(ordered)},
            "in": {"$cond": [{"$eq": ["$$r", None]}, "$health", new_health]},
        }}}}]
        result = await self._mongo.call(
            lambda db: db[INTEGRATION_STATE].update_many(query, pipeline)
        )
        return int(result.modified_count)


def _decision_tree(ordered: list[tuple[str, dict[str, Any]]]) -> Any:
    """An expression giving each `_id` of `ordered` (sorted by id) its value, else null."""
    if len(ordered) == 1:
        key, value = ordered[0]
        entry = {**value, "push": [value["entry"]]}
        return {"$cond": [{"$eq": ["$_id", key]}, {"$literal": entry}, None]}
    middle = len(ordered) // 2
    return {"$cond": [{"$lt": ["$_id", ordered[middle][0]]},
                      _decision_tree(ordered[:middle]), _decision_tree(ordered[middle:])]}
