"""Run documents: the execution state of every job, in `mwapjobs_runs`.

A run is one job from the moment it is added until it is removed:

    delayed ──(due)──▶ waiting ──(claimed)──▶ active ──▶ completed
       ▲                  ▲                     │  └───▶ failed
       └──(retry later)───┴────(lease expired)──┘

Every state change is one conditional update (`state` and, for active runs,
the lease owner are part of the filter), so a late or duplicate actor changes
nothing instead of clobbering newer state. Queries use the indexes made in
`ensure_indexes`; nothing here scans run history.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, Literal

from bson import ObjectId
from bson.errors import InvalidId
from pymongo import ASCENDING, DESCENDING, ReturnDocument
from pymongo.errors import DuplicateKeyError

from .mongo import QUEUES, RUNS, Mongo

State = Literal["delayed", "waiting", "active", "completed", "failed"]
STATES: tuple[State, ...] = ("delayed", "waiting", "active", "completed", "failed")
PENDING: tuple[State, ...] = ("delayed", "waiting", "active")
FINISHED: tuple[State, ...] = ("completed", "failed")


def parse_run_id(run_id: str) -> ObjectId | None:
    try:
        return ObjectId(run_id)
    except (InvalidId, TypeError):
        return None


def _create_index(
    collection: str, keys: list[tuple[str, int]], options: dict[str, Any]
) -> Callable[[Any], Awaitable[str]]:
    return lambda db: db[collection].create_index(keys, **options)


class RunStore:
    """All queries on runs and queue state. Methods map one-to-one to round trips
    unless their docstring says otherwise."""

    def __init__(self, mongo: Mongo) -> None:
        self._mongo = mongo

    async def ensure_indexes(self) -> None:
        specs: list[tuple[list[tuple[str, int]], dict[str, Any]]] = [
            (
                [("queue", ASCENDING), ("state", ASCENDING), ("priority", DESCENDING),
                 ("runAt", ASCENDING)],
                {"name": "mwapjobs_claim"},
            ),
            ([("state", ASCENDING), ("runAt", ASCENDING)], {"name": "mwapjobs_due"}),
            ([("state", ASCENDING), ("leaseUntil", ASCENDING)], {"name": "mwapjobs_lease"}),
            (
                [("queue", ASCENDING), ("state", ASCENDING), ("finishedAt", DESCENDING)],
                {"name": "mwapjobs_history"},
            ),
            ([("key", ASCENDING)], {"name": "mwapjobs_dedupe", "unique": True, "sparse": True}),
        ]
        for keys, options in specs:
            await self._mongo.call(_create_index(RUNS, keys, options))

    # -- adding ------------------------------------------------------------

    async def insert(self, doc: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Insert a new run; if its `key` is pending already, return that run instead.

        Returns (run, created). Two round trips when deduplicated.
        """
        try:
            await self._mongo.call(lambda db: db[RUNS].insert_one(doc))
            return doc, True
        except DuplicateKeyError:
            existing = await self._mongo.call(lambda db: db[RUNS].find_one({"key": doc["key"]}))
            if existing is None:  # it finished between our insert and this read
                return await self.insert(doc)
            return existing, False

    # -- the engine's hot path --------------------------------------------

    async def promote_due(self, now: datetime) -> int:
        """Move every delayed run whose time has come to waiting, in one query."""
        result = await self._mongo.call(
            lambda db: db[RUNS].update_many(
                {"state": "delayed", "runAt": {"$lte": now}}, {"$set": {"state": "waiting"}}
            )
        )
        return int(result.modified_count)

    async def claim(
        self, queue: str, limit: int, owner: str, now: datetime, lease: float
    ) -> list[dict[str, Any]]:
        """Take up to `limit` waiting runs, highest priority then oldest first.

        Two round trips per batch: read the candidates, then flip those still
        waiting to active under a batch token. A third reads back by token
        only if someone else took some of them in between.
        """
        candidates: list[dict[str, Any]] = await self._mongo.call(
            lambda db: db[RUNS]
            .find({"queue": queue, "state": "waiting"})
            .sort([("priority", DESCENDING), ("runAt", ASCENDING)])
            .limit(limit)
            .to_list(limit)
        )
        if not candidates:
            return []
        token = uuid.uuid4().hex
        until = now + timedelta(seconds=lease)
        ids = [c["_id"] for c in candidates]
        claimed = {
            "state": "active", "leaseOwner": owner, "leaseUntil": until,
            "startedAt": now, "claimToken": token,
        }
        result = await self._mongo.call(
            lambda db: db[RUNS].update_many(
                {"_id": {"$in": ids}, "state": "waiting"},
                {"$set": claimed, "$inc": {"attemptsMade": 1}},
            )
        )
        if result.modified_count != len(ids):
            mine: list[dict[str, Any]] = await self._mongo.call(
                lambda db: db[RUNS].find({"claimToken": token}).to_list(None)
            )
            return mine
        for doc in candidates:
            doc.update(claimed)
            doc["attemptsMade"] = doc.get("attemptsMade", 0) + 1
        return candidates

    async def renew(self, ids: list[ObjectId], owner: str, until: datetime) -> int:
        """Extend the lease of our active runs, all in one query."""
        if not ids:
            return 0
        result = await self._mongo.call(
            lambda db: db[RUNS].update_many(
                {"_id": {"$in": ids}, "state": "active", "leaseOwner": owner},
                {"$set": {"leaseUntil": until}},
            )
        )
        return int(result.modified_count)

    async def finish(
        self,
        run_id: ObjectId,
        owner: str,
        state: State,
        fields: dict[str, Any],
        attempt: dict[str, Any],
    ) -> bool:
        """End an attempt: move our active run to `state` and record the attempt.

        False when the run is no longer ours (removed, or its lease was lost),
        in which case nothing is written.
        """
        update: dict[str, Any] = {
            "$set": {"state": state, **fields},
            "$unset": {"leaseOwner": "", "leaseUntil": "", "claimToken": ""},
            "$push": {"attempts": attempt},
        }
        if state in FINISHED:
            update["$unset"]["key"] = ""  # a finished run no longer blocks its job id
        result = await self._mongo.call(
            lambda db: db[RUNS].update_one(
                {"_id": run_id, "state": "active", "leaseOwner": owner}, update
            )
        )
        return bool(result.modified_count)

    async def release(self, ids: list[ObjectId], owner: str) -> int:
        """Give our unfinished active runs back (shutdown): waiting again, attempt refunded."""
        if not ids:
            return 0
        result = await self._mongo.call(
            lambda db: db[RUNS].update_many(
                {"_id": {"$in": ids}, "state": "active", "leaseOwner": owner},
                {
                    "$set": {"state": "waiting"},
                    "$unset": {"leaseOwner": "", "leaseUntil": "", "claimToken": ""},
                    "$inc": {"attemptsMade": -1},
                },
            )
        )
        return int(result.modified_count)

    async def expired_leases(self, now: datetime, exclude: list[ObjectId]) -> list[dict[str, Any]]:
        """Active runs whose lease ran out: their worker died (or froze)."""
        expired: list[dict[str, Any]] = await self._mongo.call(
            lambda db: db[RUNS]
            .find({"state": "active", "leaseUntil": {"$lt": now}, "_id": {"$nin": exclude}})
            .to_list(None)
        )
        return expired

    async def recover_stalled(
        self, run: dict[str, Any], stalled_limit: int, now: datetime
    ) -> State | None:
        """Requeue a stalled run, or fail it once it has stalled more than `stalled_limit` times.

        The filter repeats the expired lease, so a worker that renewed in the
        meantime keeps its run. Returns the new state, or None if untouched.
        """
        stalled = int(run.get("stalledCount", 0)) + 1
        base_filter = {
            "_id": run["_id"], "state": "active",
            "leaseOwner": run.get("leaseOwner"), "leaseUntil": run.get("leaseUntil"),
        }
        unset = {"leaseOwner": "", "leaseUntil": "", "claimToken": ""}
        if stalled > stalled_limit:
            error = {
                "message": f"job stalled {stalled} times (limit {stalled_limit}): "
                "the process running it kept dying",
                "type": "Stalled",
                "permanent": True,
            }
            update = {
                "$set": {"state": "failed", "stalledCount": stalled, "finishedAt": now,
                         "error": error},
                "$unset": {**unset, "key": ""},
            }
            new_state: State = "failed"
        else:
            update = {
                "$set": {"state": "waiting", "stalledCount": stalled, "runAt": now},
                "$unset": unset,
                "$inc": {"attemptsMade": -1},  # the attempt never got to finish
            }
            new_state = "waiting"
        result = await self._mongo.call(lambda db: db[RUNS].update_one(base_filter, update))
        return new_state if result.modified_count else None

    async def reschedule(self, run_id: ObjectId, owner: str, run_at: datetime,
                         attempt: dict[str, Any], error: dict[str, Any]) -> bool:
        """End a failed attempt with a retry at `run_at` (state delayed)."""
        return await self.finish(run_id, owner, "delayed", {"runAt": run_at, "error": error},
                                 attempt)

    async def postpone(self, run_id: ObjectId, owner: str, run_at: datetime,
                       attempt: dict[str, Any]) -> bool:
        """Put our active run back to delayed until `run_at`, refunding the attempt."""
        result = await self._mongo.call(
            lambda db: db[RUNS].update_one(
                {"_id": run_id, "state": "active", "leaseOwner": owner},
                {"$set": {"state": "delayed", "runAt": run_at},
                 "$unset": {"leaseOwner": "", "leaseUntil": "", "claimToken": ""},
                 "$push": {"attempts": attempt}, "$inc": {"attemptsMade": -1}},
            )
        )
        return bool(result.modified_count)

    # -- operations ----------------------------------------------------------

    async def get(self, run_id: ObjectId) -> dict[str, Any] | None:
        return await self._mongo.call(lambda db: db[RUNS].find_one({"_id": run_id}))

    async def count(self, queue: str, state: State) -> int:
        """An index-only count on the (queue, state, ...) prefix."""
        n = await self._mongo.call(
            lambda db: db[RUNS].count_documents({"queue": queue, "state": state})
        )
        return int(n)

    async def page(
        self, queue: str, state: State, skip: int, limit: int
    ) -> list[dict[str, Any]]:
        """Runs of one queue and state, in the order an operator expects:
        finished ones newest first, pending ones in the order they will run."""
        if state in FINISHED:
            order = [("finishedAt", DESCENDING)]
        else:
            order = [("priority", DESCENDING), ("runAt", ASCENDING)]
        return await self._mongo.call(
            lambda db: db[RUNS]
            .find({"queue": queue, "state": state})
            .sort(order)
            .skip(skip)
            .limit(limit)
            .to_list(limit)
        )

    async def requeue(
        self, run_id: ObjectId, from_states: tuple[State, ...], key: str | None, now: datetime,
        reset: dict[str, Any],
    ) -> dict[str, Any] | None:
        """Move a run in one of `from_states` to waiting now (retry, promote).

        Raises DuplicateKeyError when re-pending it would collide with another
        pending run of the same job id.
        """
        update: dict[str, Any] = {"$set": {"state": "waiting", "runAt": now, **reset}}
        if key:
            update["$set"]["key"] = key
        return await self._mongo.call(
            lambda db: db[RUNS].find_one_and_update(
                {"_id": run_id, "state": {"$in": list(from_states)}},
                update,
                return_document=ReturnDocument.AFTER,
            )
        )

    async def delete(self, run_id: ObjectId, states: tuple[State, ...]) -> dict[str, Any] | None:
        """Delete a run if it is in one of `states`; returns what was deleted."""
        return await self._mongo.call(
            lambda db: db[RUNS].find_one_and_delete({"_id": run_id, "state": {"$in": list(states)}})
        )

    async def delete_finished_before(self, queue: str, state: State, before: datetime) -> int:
        result = await self._mongo.call(
            lambda db: db[RUNS].delete_many(
                {"queue": queue, "state": state, "finishedAt": {"$lt": before}}
            )
        )
        return int(result.deleted_count)

    async def delete_beyond(self, queue: str, state: State, keep: int,
                            batch: int = 10_000) -> int:
        """Keep the newest `keep` finished runs of a queue and state; delete up to
        `batch` of the rest (the next pass takes more). Two round trips."""
        older: list[dict[str, Any]] = await self._mongo.call(
            lambda db: db[RUNS]
            .find({"queue": queue, "state": state}, {"_id": 1})
            .sort([("finishedAt", DESCENDING), ("_id", DESCENDING)])
            .skip(keep)
            .limit(batch)
            .to_list(batch)
        )
        if not older:
            return 0
        ids = [doc["_id"] for doc in older]
        result = await self._mongo.call(
            lambda db: db[RUNS].delete_many({"_id": {"$in": ids}, "state": state})
        )
        return int(result.deleted_count)

    async def pending_by_job(self, queue: str,
                             job_ids: list[str] | None = None) -> dict[str, dict[str, Any]]:
        """jobId → {state, runAt} of a queue's pending runs (all, or those of `job_ids`)."""
        query: dict[str, Any] = {"queue": queue, "state": {"$in": list(PENDING)}}
        if job_ids is not None:
            query["jobId"] = {"$in": job_ids}
        docs = await self._mongo.call(
            lambda db: db[RUNS].find(query, {"jobId": 1, "state": 1, "runAt": 1}).to_list(None)
        )
        return {d["jobId"]: d for d in docs if d.get("jobId") is not None}

    async def delete_not_started(self, key: str) -> dict[str, Any] | None:
        """Delete the delayed or waiting run of a job id; an active one is left alone."""
        return await self._mongo.call(
            lambda db: db[RUNS].find_one_and_delete(
                {"key": key, "state": {"$in": ["delayed", "waiting"]}}
            )
        )

    async def replace_pending(self, key: str, fields: dict[str, Any]) -> dict[str, Any] | None:
        """Update the not-yet-started run of a job id (new time or data); None if there is
        none, or it is already active."""
        return await self._mongo.call(
            lambda db: db[RUNS].find_one_and_update(
                {"key": key, "state": {"$in": ["delayed", "waiting"]}},
                {"$set": fields},
                return_document=ReturnDocument.AFTER,
            )
        )

    # -- queue state -----------------------------------------------------------

    async def set_paused(self, queue: str, paused: bool) -> None:
        await self._mongo.call(
            lambda db: db[QUEUES].update_one(
                {"_id": queue}, {"$set": {"paused": paused}}, upsert=True
            )
        )

    async def paused_queues(self) -> set[str]:
        docs = await self._mongo.call(
            lambda db: db[QUEUES].find({"paused": True}, {"_id": 1}).to_list(None)
        )
        return {d["_id"] for d in docs}
