"""Upkeep's queries (jobs/maintenance/): expired OAuth flows, history past its retention,
and what the database report reads (indexes, references between collections, sizes).

Everything here is bounded: reads take at most `limit` documents in index order, deletes
take the ids just read (so a batch never grows), and the reference checks read grouped
values (`$group`), never whole collections. The only backend data written is the reset
of an expired OAuth flow, exactly as the backend's own reset endpoint writes it; the
only backend data deleted is the audit log past its retention (a collection the backend
does not have yet, handled only if it exists).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from bson import ObjectId, json_util
from bson.errors import InvalidId
from bson.json_util import RELAXED_JSON_OPTIONS
from pymongo import ASCENDING, DESCENDING
from pymongo.errors import OperationFailure, PyMongoError

from .mongo import Mongo, StoreUnavailable
from .names import INTEGRATION_STATE, INTEGRATIONS, MAINTENANCE_STATE, RUNS

# The backend's OAuth flow state (`integration.oauth`): what its reset endpoint unsets.
FLOW_FIELDS = ("flowId", "nonce", "stateHash", "pkceVerifierEncrypted", "createdAt",
               "expiresAt")
OPEN_FLOW_STATUSES = ("initiated", "exchanging")  # a flow in these holds a PKCE verifier
FLOW_INDEX = "mwapjobs_oauth_status_expiresAt"
REPORT_ID = "report"


@dataclass(frozen=True)
class Cutoff:
    """Documents older than this go: `date < before`, and with `last_id`, also those at
    `before` exactly whose `_id <= last_id` (a count boundary falls on one document)."""

    before: datetime
    last_id: Any = None


@dataclass(frozen=True)
class HistorySource:
    """One kind of history: where it lives, which date says its age, and what may go.

    `folder` names its archive folder (and files); `base` is the filter every read and
    delete repeats (a delivered notification, a finished run of one queue...);
    `string_dates`: the date may also be an ISO 8601 string (the backend's audit lines
    carry `timestamp` as text)."""

    folder: str
    collection: str
    date_field: str
    base: dict[str, Any] = field(default_factory=dict)
    string_dates: bool = False


def older_than(source: HistorySource, cutoff: Cutoff) -> dict[str, Any]:
    """The filter of `source`'s documents past `cutoff`."""
    name = source.date_field
    branches: list[dict[str, Any]] = [{name: {"$lt": cutoff.before}}]
    if cutoff.last_id is not None:
        branches.append({name: cutoff.before, "_id": {"$lte": cutoff.last_id}})
    if source.string_dates:
        text = cutoff.before.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")
        branches.append({name: {"$type": "string", "$lt": text}})
    query = branches[0] if len(branches) == 1 else {"$or": branches}
    return {**source.base, **query}


def encode_lines(docs: Iterable[dict[str, Any]]) -> bytes:
    """Documents as newline-delimited relaxed Extended JSON (what `mongoexport` writes and
    `mongoimport` reads back; `jq` reads it as it is: dates are `{"$date": "..."}`)."""
    return b"".join(json_util.dumps(d, json_options=RELAXED_JSON_OPTIONS).encode() + b"\n"
                    for d in docs)


def hex_variants(values: Iterable[str]) -> list[Any]:
    """Each id as the string the backend writes and, where it is one, as an ObjectId."""
    out: list[Any] = []
    for value in values:
        out.append(value)
        with contextlib.suppress(InvalidId, TypeError):
            out.append(ObjectId(value))
    return out


def _command(args: tuple[Any, ...]) -> Callable[[Any], Awaitable[dict[str, Any]]]:
    return lambda db: db.command(*args)


def _ids_in(collection: str,
            ids: list[Any]) -> Callable[[Any], Awaitable[list[dict[str, Any]]]]:
    return lambda db: db[collection].find({"_id": {"$in": ids}}, {"_id": 1}).to_list(None)


class MaintenanceStore:
    def __init__(self, mongo: Mongo) -> None:
        self._mongo = mongo

    async def ensure_indexes(self) -> None:
        """Our index on the backend's integrations for the expired-flow look-up (named as
        ours, like the others mwapjobs makes there)."""
        await self._mongo.call(lambda db: db[INTEGRATIONS].create_index(
            [("oauth.status", ASCENDING), ("oauth.expiresAt", ASCENDING)], name=FLOW_INDEX))

    # -- expired OAuth flows ------------------------------------------------------------

    async def expired_flows(self, now: datetime, limit: int) -> list[dict[str, Any]]:
        """Integrations whose flow expired while still open (oldest expiry first), with
        only what the conditional reset repeats; never the encrypted verifier."""
        query = {"oauth.status": {"$in": list(OPEN_FLOW_STATUSES)},
                 "oauth.expiresAt": {"$lt": now}}
        fields = {"_id": 1, "tenantId": 1, "providerId": 1, "oauth.status": 1,
                  "oauth.flowId": 1, "oauth.expiresAt": 1}
        docs: list[dict[str, Any]] = await self._mongo.call(
            lambda db: db[INTEGRATIONS].find(query, fields)
            .sort([("oauth.expiresAt", ASCENDING), ("_id", ASCENDING)]).limit(limit)
            .to_list(limit))
        return docs

    async def reset_flow(self, doc: dict[str, Any], now: datetime) -> bool:
        """The backend's reset: every flow field unset, `status: 'idle'`, `oauth.updatedAt`
        and the document's `updatedAt`. Only if the flow is still the one read (same id,
        status and expiry): a tenant who started a new flow meanwhile keeps it."""
        oauth = doc.get("oauth") or {}
        query = {"_id": doc["_id"], "oauth.flowId": oauth.get("flowId"),
                 "oauth.status": oauth.get("status"), "oauth.expiresAt": oauth.get("expiresAt")}
        update = {"$set": {"oauth.status": "idle", "oauth.updatedAt": now, "updatedAt": now},
                  "$unset": {f"oauth.{name}": "" for name in FLOW_FIELDS}}
        result = await self._mongo.call(lambda db: db[INTEGRATIONS].update_one(query, update))
        return bool(result.modified_count)

    # -- history past its retention ------------------------------------------------------

    async def collection_exists(self, name: str) -> bool:
        names = await self._mongo.call(
            lambda db: db.list_collection_names(filter={"name": name}))
        return name in names

    async def count_boundary(self, queue: str, state: str, keep: int) -> Cutoff | None:
        """Where keeping the newest `keep` finished runs of a queue and state begins: the
        newest run beyond them (the history index, in its own order), or None."""
        docs: list[dict[str, Any]] = await self._mongo.call(
            lambda db: db[RUNS].find({"queue": queue, "state": state},
                                     {"_id": 1, "finishedAt": 1})
            .sort([("finishedAt", DESCENDING), ("_id", DESCENDING)]).skip(keep).limit(1)
            .to_list(1))
        if not docs or not isinstance(docs[0].get("finishedAt"), datetime):
            return None
        return Cutoff(docs[0]["finishedAt"], docs[0]["_id"])

    async def oldest(self, source: HistorySource, cutoff: Cutoff,
                     limit: int) -> list[dict[str, Any]]:
        """Up to `limit` documents past `cutoff`, oldest first (by date, then `_id`)."""
        query = older_than(source, cutoff)
        docs: list[dict[str, Any]] = await self._mongo.call(
            lambda db: db[source.collection].find(query)
            .sort([(source.date_field, ASCENDING), ("_id", ASCENDING)]).limit(limit)
            .to_list(limit))
        return docs

    async def delete(self, source: HistorySource, ids: Sequence[Any], cutoff: Cutoff) -> int:
        """Delete these documents (the ones just read), still only if they are past the
        cutoff: one that changed meanwhile stays."""
        if not ids:
            return 0
        query = {"$and": [{"_id": {"$in": list(ids)}}, older_than(source, cutoff)]}
        result = await self._mongo.call(lambda db: db[source.collection].delete_many(query))
        return int(result.deleted_count)

    async def old_health_entries(self, before: datetime, limit: int,
                                 after: str | None) -> list[dict[str, Any]]:
        """Our notes with health-history entries older than `before`, in `_id` order after
        `after`: `{_id, health: {history, tenantId, providerId}}`."""
        query: dict[str, Any] = {"health.history.at": {"$lt": before}}
        if after is not None:
            query["_id"] = {"$gt": after}
        fields = {"health.history": 1, "health.tenantId": 1, "health.providerId": 1}
        docs: list[dict[str, Any]] = await self._mongo.call(
            lambda db: db[INTEGRATION_STATE].find(query, fields).sort("_id", ASCENDING)
            .limit(limit).to_list(limit))
        return docs

    async def pull_health_entries(self, ids: Sequence[Any], before: datetime) -> int:
        """Remove the history entries older than `before` from these notes (one update)."""
        if not ids:
            return 0
        result = await self._mongo.call(lambda db: db[INTEGRATION_STATE].update_many(
            {"_id": {"$in": list(ids)}},
            {"$pull": {"health.history": {"at": {"$lt": before}}}}))
        return int(result.modified_count)

    # -- the database report ---------------------------------------------------------------

    async def indexes(self, collection: str) -> list[dict[str, Any]]:
        """`{name, key: [[field, direction], ...], unique}` of each index of a collection."""
        info: dict[str, Any] = await self._mongo.call(
            lambda db: db[collection].index_information())
        return [{"name": name, "key": [[str(k), v] for k, v in spec.get("key", [])],
                 "unique": bool(spec.get("unique"))} for name, spec in info.items()]

    async def create_index(self, collection: str, keys: Sequence[tuple[str, int]], name: str,
                           unique: bool = False) -> None:
        await self._mongo.call(lambda db: db[collection].create_index(
            list(keys), name=name, unique=unique))

    async def referenced(self, collection: str, field_name: str) -> dict[str, int]:
        """Each value of `field_name` in `collection`, as a string, with how many documents
        carry it (a `$group`: one row per value, never the documents)."""
        rows = await self._mongo.call(lambda db: db[collection].aggregate(
            [{"$match": {field_name: {"$nin": [None, ""]}}},
             {"$group": {"_id": f"${field_name}", "n": {"$sum": 1}}}]).to_list(None))
        out: dict[str, int] = {}
        for row in rows:
            key = str(row["_id"])
            out[key] = out.get(key, 0) + int(row["n"])
        return out

    async def existing_ids(self, collection: str, ids: Sequence[str],
                           batch: int = 1000) -> set[str]:
        """Which of `ids` (compared as strings) name a document of `collection`, whether
        its `_id` is stored as a string or an ObjectId; one query per `batch` ids."""
        found: set[str] = set()
        for start in range(0, len(ids), batch):
            chunk = hex_variants(ids[start:start + batch])
            docs = await self._mongo.call(_ids_in(collection, chunk))
            found.update(str(d["_id"]) for d in docs)
        return found

    async def sample_referencing(self, collection: str, field_name: str,
                                 values: Sequence[str], limit: int) -> list[str]:
        """Ids of up to `limit` documents whose `field_name` is one of `values`."""
        if not values:
            return []
        chunk = list(values[:1000])
        docs = await self._mongo.call(
            lambda db: db[collection].find({field_name: {"$in": chunk}}, {"_id": 1})
            .sort("_id", ASCENDING).limit(limit).to_list(limit))
        return [str(d["_id"]) for d in docs]

    async def collection_names(self) -> list[str]:
        names: list[str] = await self._mongo.call(lambda db: db.list_collection_names())
        return sorted(names)

    async def estimated_count(self, collection: str) -> int:
        n = await self._mongo.call(lambda db: db[collection].estimated_document_count())
        return int(n)

    async def command(self, *args: Any) -> dict[str, Any] | str:
        """A read-only server command (`collStats`, `dbStats`); the refusal as text when
        this user may not run it, or the server does not have it."""
        try:
            answer: dict[str, Any] = await self._mongo.call(_command(args))
        except StoreUnavailable:
            raise
        except (OperationFailure, PyMongoError, NotImplementedError, TypeError) as exc:
            return f"{type(exc).__name__}: {exc}"[:200]
        return answer

    # -- our notes ----------------------------------------------------------------------------

    async def save_report(self, report: dict[str, Any]) -> None:
        await self._mongo.call(lambda db: db[MAINTENANCE_STATE].replace_one(
            {"_id": REPORT_ID}, {"_id": REPORT_ID, **report}, upsert=True))

    async def report(self) -> dict[str, Any] | None:
        doc: dict[str, Any] | None = await self._mongo.call(
            lambda db: db[MAINTENANCE_STATE].find_one({"_id": REPORT_ID}, {"_id": 0}))
        return doc
