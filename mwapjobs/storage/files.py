"""The file index: `virtualFiles` (the backend's planned collection, which it reads), our
per-project summary and pass state (`mwapjobs_file_index`), the folders a Google Drive
walk has still to list (`mwapjobs_file_walk`), and the project reads the index needs.

`virtualFiles`, one document per provider item (file or folder) of a project's folder,
in the schema the backend's docs plan (../shared/mwap-data-model.md):

    _id            24 hex characters derived from (integrationId, providerFileId), so
                   the same item always has the same document and a page can be
                   written without reading its ids first
    projectId, integrationId, providerId   hex strings (the backend's id form)
    providerFileId the provider's own id
    name, path     path: absolute display path from the provider's root
    type           MIME type (folders: `inode/directory`)
    size           bytes, or null when the provider gives none (folders, Google Docs)
    modifiedTime   Date or null
    metadata       {permissions: [str], checksum?: str} (never a download URL)
    syncStatus     {lastSync: Date, status: 'synced' | 'pending' | 'error', error?}
    createdAt, updatedAt

Indexes (named `mwapjobs_*` so that they stand apart from any the backend adds): the
planned `{projectId}`, `{integrationId}`, `{providerFileId, integrationId}` unique,
`{syncStatus.lastSync}`, `{path}`, plus `{projectId, syncStatus.lastSync}` for the sweep
at the end of a full pass.

Writes are batched per provider page: one `$in` read by `_id`, one `insert_many`, one
pipeline update that hands each changed document its own values (`batch.by_id`, as
mongomock has no working `bulk_write`), one `update_many` for the unchanged ones a full
pass marks as seen. Removals read what they remove first (its size and type, for the
summary's counts) and delete by `_id`, in chunks, so memory stays bounded.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from bson import ObjectId
from bson.errors import InvalidId
from pymongo import ASCENDING
from pymongo.errors import BulkWriteError, DuplicateKeyError

from .batch import by_id
from .mongo import Mongo
from .names import FILE_INDEX, FILE_WALK, INTEGRATIONS, PROJECTS, VIRTUAL_FILES

FOLDER_TYPE = "inode/directory"
CHUNK = 1000  # documents read or removed per round trip
# What a page's writer compares, and reads back to compare.
COMPARED = ("name", "path", "type", "size", "modifiedTime", "metadata")
_EXISTING = {"_id": 1, "projectId": 1, "providerFileId": 1, "syncStatus": 1, "createdAt": 1,
             **{name: 1 for name in COMPARED}}
_REMOVED = {"_id": 1, "type": 1, "size": 1, "path": 1}
PROJECT_FIELDS = {"_id": 1, "tenantId": 1, "cloudIntegrationId": 1, "folderpath": 1,
                  "name": 1, "archived": 1}
# What an index pass needs from an integration: the (encrypted) tokens too.
INTEGRATION_FIELDS = {"_id": 1, "tenantId": 1, "providerId": 1, "status": 1,
                      "tokenExpiresAt": 1, "accessToken": 1, "refreshToken": 1}


def file_id(integration_id: str, provider_file_id: str) -> str:
    """The `_id` of an item's document: the same item, the same document."""
    digest = hashlib.sha256(f"{integration_id}\0{provider_file_id}".encode()).hexdigest()
    return digest[:24]


def id_variants(value: Any) -> list[Any]:
    """A backend id as it may be stored: the hex string, or an ObjectId (older documents)."""
    text = str(value)
    variants: list[Any] = [text]
    with contextlib.suppress(InvalidId, TypeError):
        variants.append(ObjectId(text))
    return variants


def under(path: str) -> str:
    """A regex matching `path` and everything below it, case-insensitively meant."""
    return "^" + re.escape(path.rstrip("/")) + "(/|$)"


class FileIndexStore:
    def __init__(self, mongo: Mongo) -> None:
        self._mongo = mongo

    async def ensure_indexes(self) -> None:
        specs: list[tuple[str, list[tuple[str, int]], bool]] = [
            (VIRTUAL_FILES, [("projectId", ASCENDING)], False),
            (VIRTUAL_FILES, [("integrationId", ASCENDING)], False),
            (VIRTUAL_FILES, [("providerFileId", ASCENDING), ("integrationId", ASCENDING)], True),
            (VIRTUAL_FILES, [("syncStatus.lastSync", ASCENDING)], False),
            (VIRTUAL_FILES, [("path", ASCENDING)], False),
            (VIRTUAL_FILES, [("projectId", ASCENDING), ("syncStatus.lastSync", ASCENDING)],
             False),
            (FILE_INDEX, [("failingSince", ASCENDING)], False),
            (FILE_WALK, [("projectId", ASCENDING), ("folderId", ASCENDING)], True),
            (FILE_WALK, [("projectId", ASCENDING), ("seq", ASCENDING), ("folderId", ASCENDING)],
             False),
        ]
        for collection, keys, unique in specs:
            name = "mwapjobs_" + "_".join(k.replace(".", "_") for k, _ in keys)
            await self._create_index(collection, keys, name, unique)

    async def _create_index(self, collection: str, keys: list[tuple[str, int]], name: str,
                            unique: bool) -> None:
        await self._mongo.call(lambda db: db[collection].create_index(keys, name=name,
                                                                      unique=unique))

    async def _by_id(self, collection: str, value: Any, projection: dict[str, int]
                     ) -> dict[str, Any] | None:
        """One document by `_id` in either form (two equality lookups, not one `$in`:
        the common case stays one query)."""
        for variant in id_variants(value):
            doc = await self._find_one(collection, {"_id": variant}, projection)
            if doc is not None:
                return doc
        return None

    async def _find_one(self, collection: str, query: dict[str, Any],
                        projection: dict[str, int]) -> dict[str, Any] | None:
        doc: dict[str, Any] | None = await self._mongo.call(
            lambda db: db[collection].find_one(query, projection))
        return doc

    # -- MWAP's projects and integrations ---------------------------------------------

    async def project(self, project_id: str) -> dict[str, Any] | None:
        """A project by its `_id`, stored as a hex string or an ObjectId."""
        return await self._by_id(PROJECTS, project_id, PROJECT_FIELDS)

    async def indexable_projects(self) -> list[dict[str, Any]]:
        """Every project that is not archived and names an integration (one query)."""
        docs: list[dict[str, Any]] = await self._mongo.call(
            lambda db: db[PROJECTS].find(
                {"archived": {"$ne": True}, "cloudIntegrationId": {"$nin": [None, ""]}},
                PROJECT_FIELDS).to_list(None))
        return docs

    async def integration(self, integration_id: Any) -> dict[str, Any] | None:
        """An integration by either id form, with its encrypted tokens."""
        return await self._by_id(INTEGRATIONS, integration_id, INTEGRATION_FIELDS)

    async def integrations(self, ids: Sequence[Any]) -> dict[str, dict[str, Any]]:
        """Integrations by hex id (both forms looked up), without their tokens but with
        `connected` (an access token is stored)."""
        variants = [v for i in {str(i) for i in ids} for v in id_variants(i)]
        docs = await self._mongo.call(lambda db: db[INTEGRATIONS].find(
            {"_id": {"$in": variants}},
            {"_id": 1, "tenantId": 1, "providerId": 1, "status": 1, "accessToken": 1},
        ).to_list(None))
        found: dict[str, dict[str, Any]] = {}
        for doc in docs:
            doc["connected"] = bool(doc.pop("accessToken", None))
            found[str(doc["_id"])] = doc
        return found

    async def write_project_metadata(self, project: dict[str, Any], file_count: int,
                                     total_size: int, last_sync: datetime) -> None:
        """The planned `projects.metadata` fields, by the document's own `_id` value, and
        nothing else (not `updatedAt`: an index is not an edit of the project)."""
        await self._mongo.call(lambda db: db[PROJECTS].update_one(
            {"_id": project["_id"]},
            {"$set": {"metadata.fileCount": file_count, "metadata.totalSize": total_size,
                      "metadata.lastSync": last_sync}}))

    # -- virtualFiles ------------------------------------------------------------------

    async def existing(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The stored documents among these `_id`s (what a page's writer compares)."""
        if not ids:
            return {}
        wanted = list(dict.fromkeys(ids))
        docs = await self._mongo.call(lambda db: db[VIRTUAL_FILES].find(
            {"_id": {"$in": wanted}}, _EXISTING).to_list(None))
        return {str(d["_id"]): d for d in docs}

    async def insert(self, docs: list[dict[str, Any]]) -> set[str]:
        """Insert new documents; returns the `_id`s that existed already (written by
        someone else meanwhile), which are left as they are."""
        if not docs:
            return set()
        try:
            await self._mongo.call(lambda db: db[VIRTUAL_FILES].insert_many(docs, ordered=False))
        except BulkWriteError as exc:
            failed = {str(docs[e["index"]]["_id"]) for e in exc.details.get("writeErrors", [])
                      if e.get("code") == 11000}
            if len(failed) != len(exc.details.get("writeErrors", [])):
                raise
            return failed
        except DuplicateKeyError:
            return {str(d["_id"]) for d in docs}
        return set()

    async def update(self, values: list[tuple[str, dict[str, Any]]]) -> int:
        """Give each document its own new values of the same top-level fields, in one
        round trip (values are literals, never interpreted)."""
        if not values:
            return 0
        ordered = sorted(values, key=lambda v: v[0])
        names = sorted(ordered[0][1])
        if any(sorted(fields) != names for _, fields in ordered):
            raise ValueError("every document of a batch update sets the same fields")
        pipeline = [
            {"$set": {"_mwapjobs": by_id(ordered)}},
            {"$set": {name: f"$_mwapjobs.{name}" for name in names}},
            {"$project": {"_mwapjobs": 0}},
        ]
        ids = [i for i, _ in ordered]
        result = await self._mongo.call(lambda db: db[VIRTUAL_FILES].update_many(
            {"_id": {"$in": ids}}, pipeline))
        return int(result.modified_count)

    async def mark_seen(self, ids: Sequence[str], at: datetime) -> None:
        """Unchanged documents a full pass saw: `syncStatus.lastSync` moves on."""
        if not ids:
            return
        wanted = list(ids)
        await self._mongo.call(lambda db: db[VIRTUAL_FILES].update_many(
            {"_id": {"$in": wanted}},
            {"$set": {"syncStatus": {"lastSync": at, "status": "synced"}}}))

    async def below(self, project_id: str, path: str, *, exclude: Sequence[str] = (),
                    case_insensitive: bool = False, limit: int = CHUNK,
                    after: str | None = None) -> list[dict[str, Any]]:
        """A project's documents at `path` or below it (`_id` order, from `after`)."""
        query: dict[str, Any] = {"projectId": project_id,
                                 "path": {"$regex": under(path),
                                          **({"$options": "i"} if case_insensitive else {})}}
        if exclude or after is not None:
            query["_id"] = {**({"$nin": list(exclude)} if exclude else {}),
                            **({"$gt": after} if after is not None else {})}
        docs: list[dict[str, Any]] = await self._mongo.call(
            lambda db: db[VIRTUAL_FILES].find(query, _REMOVED).sort("_id", ASCENDING)
            .limit(limit).to_list(None))
        return docs

    async def removable(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        """What removing these `_id`s would remove (their path, type and size)."""
        if not ids:
            return []
        wanted = list(ids)
        docs: list[dict[str, Any]] = await self._mongo.call(
            lambda db: db[VIRTUAL_FILES].find({"_id": {"$in": wanted}}, _REMOVED).to_list(None))
        return docs

    async def stale(self, project_id: str, mark: datetime, limit: int = CHUNK
                    ) -> list[dict[str, Any]]:
        """A project's documents that a full pass started at `mark` did not see."""
        docs: list[dict[str, Any]] = await self._mongo.call(
            lambda db: db[VIRTUAL_FILES].find(
                {"projectId": project_id, "syncStatus.lastSync": {"$lt": mark}}, _REMOVED)
            .limit(limit).to_list(None))
        return docs

    async def delete(self, ids: Sequence[str]) -> int:
        if not ids:
            return 0
        wanted = list(ids)
        result = await self._mongo.call(
            lambda db: db[VIRTUAL_FILES].delete_many({"_id": {"$in": wanted}}))
        return int(result.deleted_count)

    async def folder_paths(self, ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        """`_id` → (projectId, path) of the folders among these documents."""
        if not ids:
            return {}
        wanted = list(dict.fromkeys(ids))
        docs = await self._mongo.call(lambda db: db[VIRTUAL_FILES].find(
            {"_id": {"$in": wanted}, "type": FOLDER_TYPE},
            {"_id": 1, "projectId": 1, "path": 1}).to_list(None))
        return {str(d["_id"]): (str(d.get("projectId")), str(d.get("path"))) for d in docs}

    async def totals(self, project_id: str) -> tuple[int, int, int]:
        """(files, folders, bytes) of a project's index, counted now. A server answers
        from the `{projectId}` index with `$group`; the embedded store (whose `aggregate`
        copies the whole collection) sums the project's documents on its own thread."""
        if self._mongo.embedded:
            async def count(db: Any) -> tuple[int, int, int]:
                files = folders = size = 0
                async for doc in db[VIRTUAL_FILES].find({"projectId": project_id},
                                                        {"type": 1, "size": 1}):
                    if doc.get("type") == FOLDER_TYPE:
                        folders += 1
                    else:
                        files += 1
                        size += int(doc.get("size") or 0)
                return files, folders, size
            return await self._mongo.call(count)
        rows = await self._mongo.call(lambda db: db[VIRTUAL_FILES].aggregate([
            {"$match": {"projectId": project_id}},
            {"$group": {"_id": {"$eq": ["$type", FOLDER_TYPE]}, "n": {"$sum": 1},
                        "size": {"$sum": {"$ifNull": ["$size", 0]}}}},
        ]).to_list(None))
        by_kind = {bool(r["_id"]): (int(r["n"]), int(r["size"])) for r in rows}
        files, size = by_kind.get(False, (0, 0))
        return files, by_kind.get(True, (0, 0))[0], size

    async def drop_project(self, project_id: str) -> int:
        """Forget a project's index (its project is gone or archived), in chunks."""
        removed = 0
        while True:
            docs = await self._mongo.call(lambda db: db[VIRTUAL_FILES].find(
                {"projectId": project_id}, {"_id": 1}).limit(CHUNK).to_list(None))
            if not docs:
                break
            removed += await self.delete([str(d["_id"]) for d in docs])
        await self.clear_walk(project_id)
        await self._mongo.call(lambda db: db[FILE_INDEX].delete_one({"_id": project_id}))
        return removed

    # -- summary and pass state (mwapjobs_file_index) --------------------------------

    async def state(self, project_id: str) -> dict[str, Any] | None:
        doc: dict[str, Any] | None = await self._mongo.call(
            lambda db: db[FILE_INDEX].find_one({"_id": project_id}))
        return doc

    async def save_state(self, project_id: str, fields: dict[str, Any], *,
                         inc: dict[str, int] | None = None,
                         unset: Sequence[str] = ()) -> None:
        """One write of a project's summary and pass state (upserted)."""
        update: dict[str, Any] = {"$set": fields}
        if inc:
            update["$inc"] = inc
        if unset:
            update["$unset"] = {name: "" for name in unset}
        await self._mongo.call(lambda db: db[FILE_INDEX].update_one(
            {"_id": project_id}, update, upsert=True))

    async def summaries(self, ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Every project's summary (or these), without cursors and pass state."""
        query: dict[str, Any] = {} if ids is None else {"_id": {"$in": list(ids)}}
        docs: list[dict[str, Any]] = await self._mongo.call(lambda db: db[FILE_INDEX].find(
            query, {"cursor": 0, "pass": 0}).to_list(None))
        return docs

    async def failing_since(self, before: datetime) -> list[dict[str, Any]]:
        """Summaries of projects failing to sync since before `before` (oldest first)."""
        docs: list[dict[str, Any]] = await self._mongo.call(lambda db: db[FILE_INDEX].find(
            {"failingSince": {"$lte": before}},
            {"_id": 1, "tenantId": 1, "failingSince": 1, "lastError": 1},
        ).sort("failingSince", ASCENDING).limit(20).to_list(None))
        return docs

    async def count_failing_since(self, before: datetime) -> int:
        return int(await self._mongo.call(lambda db: db[FILE_INDEX].count_documents(
            {"failingSince": {"$lte": before}})))

    async def count_by_state(self) -> dict[str, int]:
        rows = await self._mongo.call(lambda db: db[FILE_INDEX].aggregate(
            [{"$group": {"_id": "$state", "n": {"$sum": 1}}}]).to_list(None))
        return {str(r["_id"]): int(r["n"]) for r in rows}

    # -- a Google Drive walk's folders to list (mwapjobs_file_walk) --------------------

    async def push_folders(self, project_id: str, folders: list[tuple[int, str, str]]) -> None:
        """Folders `(seq, folderId, path)` to list later; one already pushed stays."""
        if not folders:
            return
        docs = [{"projectId": project_id, "seq": seq, "folderId": folder, "path": path}
                for seq, folder, path in folders]
        with contextlib.suppress(BulkWriteError, DuplicateKeyError):
            await self._mongo.call(lambda db: db[FILE_WALK].insert_many(docs, ordered=False))

    async def next_folder(self, project_id: str, after: tuple[int, str] | None
                          ) -> dict[str, Any] | None:
        """The next folder to list after `(seq, folderId)`, in (seq, folderId) order."""
        query: dict[str, Any] = {"projectId": project_id}
        if after is not None:
            seq, folder = after
            query["$or"] = [{"seq": {"$gt": seq}}, {"seq": seq, "folderId": {"$gt": folder}}]
        docs: list[dict[str, Any]] = await self._mongo.call(lambda db: db[FILE_WALK].find(
            query, {"_id": 0, "seq": 1, "folderId": 1, "path": 1})
            .sort([("seq", ASCENDING), ("folderId", ASCENDING)]).limit(1).to_list(None))
        return docs[0] if docs else None

    async def clear_walk(self, project_id: str) -> None:
        await self._mongo.call(lambda db: db[FILE_WALK].delete_many({"projectId": project_id}))
