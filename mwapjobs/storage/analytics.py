"""Analytics' queries (jobs/analytics/): aggregations over MWAP's data and our notes, the
daily snapshots in `mwapjobs_analytics_daily`, the day's activity counters in
`mwapjobs_analytics_activity`, and storage-quota readings in our notes.

Every count is a `$group` in MongoDB that answers one row per group (a tenant, a tenant
and a status...), never the documents: a daily run over 10,000 tenants and 100,000
integrations costs the same dozen aggregations as over ten. Snapshots are written by
`_id` (`tenant:<tenantId>:<day>`, `platform:<day>`), a thousand per round trip, so a
rerun of a day replaces its documents (a unique index on `{tenantId, day}` besides);
activity counters are added by `{tenantId, day}`, two round trips per flush.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

from pymongo import ASCENDING, DESCENDING
from pymongo.errors import BulkWriteError

from .batch import by_id
from .mongo import Mongo
from .names import (
    ANALYTICS_ACTIVITY,
    ANALYTICS_DAILY,
    FILE_INDEX,
    INTEGRATION_STATE,
    INTEGRATIONS,
    PROJECTS,
    TENANTS,
)

Rows = list[dict[str, Any]]
_CONNECTED = {"$cond": [{"$in": [{"$ifNull": ["$accessToken", ""]}, ["", None]]}, 0, 1]}


def _aggregate(collection: str, pipeline: list[dict[str, Any]]
               ) -> Callable[[Any], Awaitable[Rows]]:
    return lambda db: db[collection].aggregate(pipeline, allowDiskUse=True).to_list(None)


class AnalyticsStore:
    def __init__(self, mongo: Mongo) -> None:
        self._mongo = mongo

    async def ensure_indexes(self) -> None:
        await self._mongo.call(lambda db: db[ANALYTICS_DAILY].create_index(
            [("tenantId", ASCENDING), ("day", ASCENDING)], name="mwapjobs_analytics_tenant_day",
            unique=True))

    # -- MWAP's data, grouped ------------------------------------------------------------

    async def tenant_ids(self) -> list[str]:
        """Every tenant's id, as a string (their `_id` is an ObjectId)."""
        rows = await self._mongo.call(_aggregate(TENANTS, [{"$project": {"_id": 1}}]))
        return [str(r["_id"]) for r in rows]

    async def projects_by_tenant(self) -> Rows:
        """`{_id: tenantId, projects, archived}` per tenant."""
        return await self._mongo.call(_aggregate(PROJECTS, [
            {"$group": {"_id": "$tenantId", "projects": {"$sum": 1},
                        "archived": {"$sum": {"$cond": [{"$eq": ["$archived", True]}, 1, 0]}}}}]))

    async def members_by_tenant(self) -> Rows:
        """`{_id: tenantId, members}`: distinct users over a tenant's projects."""
        return await self._mongo.call(_aggregate(PROJECTS, [
            {"$unwind": "$members"},
            {"$group": {"_id": {"t": "$tenantId", "u": "$members.userId"}}},
            {"$group": {"_id": "$_id.t", "members": {"$sum": 1}}}]))

    async def integrations_by_tenant(self) -> Rows:
        """`{_id: {t, p, s}, n, connected}` per tenant, provider and status."""
        return await self._mongo.call(_aggregate(INTEGRATIONS, [
            {"$group": {"_id": {"t": "$tenantId", "p": "$providerId", "s": "$status"},
                        "n": {"$sum": 1}, "connected": {"$sum": _CONNECTED}}}]))

    async def health_by_tenant(self) -> Rows:
        """`{_id: {t, o}, n}`: integrations per tenant by their last health outcome."""
        return await self._mongo.call(_aggregate(INTEGRATION_STATE, [
            {"$match": {"health.lastResult.outcome": {"$exists": True}}},
            {"$group": {"_id": {"t": "$health.tenantId", "o": "$health.lastResult.outcome"},
                        "n": {"$sum": 1}}}]))

    async def quota_by_tenant(self, since: datetime) -> Rows:
        """`{_id: tenantId, used, allocated, readings, items}` from the readings taken at
        `since` or later (a run's own: an integration gone since keeps an old one)."""
        return await self._mongo.call(_aggregate(INTEGRATION_STATE, [
            {"$match": {"quota.tenantId": {"$exists": True}, "quota.at": {"$gte": since}}},
            {"$group": {"_id": "$quota.tenantId",
                        "used": {"$sum": {"$ifNull": ["$quota.used", 0]}},
                        "allocated": {"$sum": {"$ifNull": ["$quota.allocated", 0]}},
                        "readings": {"$sum": {"$cond": [{"$eq": ["$quota.state", "ok"]}, 1, 0]}},
                        "items": {"$push": {"integrationId": "$_id",
                                            "providerId": "$quota.providerId",
                                            "state": "$quota.state", "used": "$quota.used",
                                            "allocated": "$quota.allocated",
                                            "at": "$quota.at"}}}}]))

    async def files_by_tenant(self) -> Rows | None:
        """`{_id: tenantId, files, bytes}` from the file index's per-project summaries in
        `mwapjobs_file_index` (jobs/files/ keeps `fileCount` and `totalSize` exact after
        every page, and forgets the project it no longer indexes), or None when file
        indexing never ran here. One row per project is grouped, never `virtualFiles`'
        millions of documents."""
        names = await self._mongo.call(
            lambda db: db.list_collection_names(filter={"name": FILE_INDEX}))
        if FILE_INDEX not in names:
            return None
        return await self._mongo.call(_aggregate(FILE_INDEX, [
            {"$match": {"tenantId": {"$exists": True}}},
            {"$group": {"_id": "$tenantId",
                        "files": {"$sum": {"$ifNull": ["$fileCount", 0]}},
                        "bytes": {"$sum": {"$ifNull": ["$totalSize", 0]}}}}]))

    # -- the day's activity -----------------------------------------------------------------

    async def bump_activity(self, deltas: dict[tuple[str, str], dict[str, int]]) -> None:
        """Add counts to each `(tenantId, day)`'s counters in two round trips whatever
        the number of keys: the missing documents are made (one insert), then one update
        adds each document its own counts. One upsert per key cost a write per refresh in
        a fleet of one integration per tenant (issue 11: <= 4 round trips per refresh)."""
        rows = sorted((f"{tenant_id}|{day}", tenant_id, day, inc)
                      for (tenant_id, day), counts in deltas.items()
                      if (inc := {k: v for k, v in counts.items() if v}))
        if not rows:
            return
        try:
            await self._mongo.call(lambda db: db[ANALYTICS_ACTIVITY].insert_many(
                [{"_id": key, "tenantId": tenant_id, "day": day}
                 for key, tenant_id, day, _ in rows], ordered=False))
        except BulkWriteError as exc:  # documents there already are what we want
            if any(e.get("code") != 11000 for e in exc.details.get("writeErrors", [])):
                raise
        names = sorted({name for *_, inc in rows for name in inc})
        added = {f"refresh.{name}": {"$add": [
            {"$ifNull": [f"$refresh.{name}", 0]},
            {"$ifNull": [by_id([(key, inc.get(name, 0)) for key, _, _, inc in rows]), 0]}]}
            for name in names}
        keys = [key for key, *_ in rows]
        await self._mongo.call(lambda db: db[ANALYTICS_ACTIVITY].update_many(
            {"_id": {"$in": keys}}, [{"$set": added}]))

    async def activity(self, day: str) -> Rows:
        return await self._mongo.call(lambda db: db[ANALYTICS_ACTIVITY].find(
            {"day": day}, {"tenantId": 1, "refresh": 1}).to_list(None))

    # -- quota readings (our notes per integration) -------------------------------------------

    async def record_quota(self, readings: Sequence[tuple[str, dict[str, Any]]]) -> int:
        """Keep each integration's latest reading under `quota` in our notes: the missing
        notes are made (one insert), then one update hands each its own reading."""
        if not readings:
            return 0
        ordered = sorted(readings, key=lambda r: r[0])
        with contextlib.suppress(BulkWriteError):
            await self._mongo.call(lambda db: db[INTEGRATION_STATE].insert_many(
                [{"_id": i} for i, _ in ordered], ordered=False))
        pipeline = [{"$set": {"quota": {"$ifNull": [by_id(ordered), "$quota"]}}}]
        ids = [i for i, _ in ordered]
        result = await self._mongo.call(lambda db: db[INTEGRATION_STATE].update_many(
            {"_id": {"$in": ids}}, pipeline))
        return int(result.modified_count)

    # -- snapshots ----------------------------------------------------------------------------

    async def write_snapshots(self, docs: Sequence[dict[str, Any]]) -> int:
        """Insert these snapshots; those whose `_id` is there already (a rerun of the day)
        are replaced field by field in one more update. Returns how many were replaced."""
        if not docs:
            return 0
        taken: list[Any] = []
        try:
            await self._mongo.call(lambda db: db[ANALYTICS_DAILY].insert_many(
                list(docs), ordered=False))
        except BulkWriteError as exc:
            for problem in exc.details.get("writeErrors", []):
                if problem.get("code") != 11000:
                    raise
                taken.append(docs[problem["index"]]["_id"])
        if not taken:
            return 0
        wanted = set(taken)
        values = sorted(((d["_id"], d) for d in docs if d["_id"] in wanted), key=lambda v: v[0])
        fields = sorted({name for _, d in values for name in d if name != "_id"})
        pipeline = [{"$set": {"_s": by_id(values)}},
                    {"$set": {name: f"$_s.{name}" for name in fields}},
                    {"$project": {"_s": 0}}]
        ids = [key for key, _ in values]
        await self._mongo.call(lambda db: db[ANALYTICS_DAILY].update_many(
            {"_id": {"$in": ids}}, pipeline))
        return len(ids)

    async def snapshots(self, tenant_id: str | None, first: str, last: str) -> Rows:
        """A tenant's (or, with None, the platform's) snapshots from day `first` to `last`."""
        query = {"tenantId": tenant_id, "day": {"$gte": first, "$lte": last}}
        return await self._mongo.call(lambda db: db[ANALYTICS_DAILY].find(query, {"_id": 0})
                                      .sort("day", ASCENDING).to_list(None))

    async def latest_platform(self) -> dict[str, Any] | None:
        doc: dict[str, Any] | None = await self._mongo.call(
            lambda db: db[ANALYTICS_DAILY].find_one({"tenantId": None}, {"_id": 0},
                                                    sort=[("day", DESCENDING)]))
        return doc
