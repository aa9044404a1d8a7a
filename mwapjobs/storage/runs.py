"""Run documents: the execution state of every job, in `mwapjobs_runs`.

A run is one job from the moment it is added until it is removed:

    delayed ──(due)──▶ waiting ──(claimed)──▶ active ──▶ completed
       ▲                  ▲                     │  └───▶ failed
       └──(retry later)───┴────(lease expired)──┘

A claim takes waiting runs and delayed runs that are due alike, so a delayed run needs
no promotion to be picked up (the sweep still promotes due ones, for the counts).
Every state change is one conditional update (`state` and, for active runs, the lease
owner are part of the filter), so a late or duplicate actor changes nothing instead
of clobbering newer state. Queries use the indexes made in `ensure_indexes`; nothing
here scans run history.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from bson import ObjectId
from bson.errors import InvalidId
from pymongo import ASCENDING, DESCENDING, InsertOne, ReturnDocument, UpdateOne
from pymongo.errors import BulkWriteError, DuplicateKeyError, OperationFailure

from .mongo import Mongo
from .names import QUEUES, RUNS, THROUGHPUT

State = Literal["delayed", "waiting", "active", "completed", "failed"]
STATES: tuple[State, ...] = ("delayed", "waiting", "active", "completed", "failed")
PENDING: tuple[State, ...] = ("delayed", "waiting", "active")
FINISHED: tuple[State, ...] = ("completed", "failed")
LEASE_FIELDS = ("leaseOwner", "leaseUntil", "claimToken")
# Seconds of history a page of finished runs is looked for in first (`RunStore.page`).
HISTORY_WINDOWS = (300.0, 3600.0, 86400.0, 7 * 86400.0, 30 * 86400.0)
# A data field a search may name: one plain key of `data`, never an operator (`$where`)
# or a dotted path into the run's internals. Searches also need the field to be indexed
# (`RunStore(search_fields=...)`), so this is the second wall.
SEARCH_FIELD = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
MAX_SEARCH_VALUE = 200
BULK_BATCH = 500  # runs read and updated per round trip by a bulk action
# Per-minute finished counts are kept this long: the TTL index removes older minutes
# (and `prune_throughput` does on a store without TTL), so the collection holds at most
# 2,880 small documents whatever the traffic.
THROUGHPUT_KEEP = timedelta(hours=48)
NO_ERROR_TYPE = "(none)"  # how a failed run without an error type is counted


def search_index_name(field: str) -> str:
    return f"mwapjobs_data_{field}"


@dataclass(frozen=True)
class RunSearch:
    """What to look for among the runs: a job id (exact, or a prefix) and/or one data
    field's value, optionally in one queue and one state. Every search is served by an
    index: `mwapjobs_job` (jobId, _id) or `mwapjobs_data_<field>` (data.<field>, _id)."""

    queue: str | None = None
    state: State | None = None
    job_id: str | None = None
    job_id_prefix: bool = False
    field: str | None = None
    value: str | int | None = None

    def query(self) -> dict[str, Any]:
        query: dict[str, Any] = {}
        if self.job_id is not None:
            query["jobId"] = ({"$regex": "^" + re.escape(self.job_id)} if self.job_id_prefix
                              else self.job_id)
        if self.field is not None:
            if not SEARCH_FIELD.fullmatch(self.field):
                raise ValueError(f"not a searchable field name: {self.field[:64]!r}")
            value = self.value
            query[f"data.{self.field}"] = (
                {"$in": [value, int(value)]} if isinstance(value, str)
                and re.fullmatch(r"-?[0-9]{1,18}", value) else value)
        if self.queue is not None:
            query["queue"] = self.queue
        if self.state is not None:
            query["state"] = self.state
        return query

    def index(self) -> str:
        """The index the search walks, named to the server: a planner may not see on its
        own that a partial index fits, or prefer a (queue, ...) one that reads history."""
        return "mwapjobs_job" if self.job_id is not None else search_index_name(
            str(self.field))

    def order(self) -> list[tuple[str, int]]:
        """The order of the index the search walks: newest first within a job id or value."""
        if self.job_id is not None:
            return [("jobId", ASCENDING), ("_id", DESCENDING)]
        return [(f"data.{self.field}", ASCENDING), ("_id", DESCENDING)]


class JobIdTaken(Exception):
    """Another pending run already has this job id."""


RunId = ObjectId  # what identifies a run; its text form is the API's `runId`


def parse_run_id(run_id: str) -> RunId | None:
    try:
        return ObjectId(run_id)
    except (InvalidId, TypeError):
        return None


def dedupe_key(queue: str, job_id: str) -> str:
    """What makes a job id unique among the pending runs of a queue."""
    return f"{queue}:{job_id}"


@dataclass(frozen=True)
class Outcome:
    """The end of one attempt, as written by `write_outcomes`.

    `fields` are set on the run (absolute values: the run is ours while we write);
    `attempt` is appended to its history. A finishing outcome (completed, failed) also
    frees the job id.
    """

    run_id: ObjectId
    fields: dict[str, Any]
    attempt: dict[str, Any]
    follow: dict[str, Any] | None = None  # a new run (`new_run`) to insert with it

    @property
    def finishing(self) -> bool:
        return self.fields.get("state") in FINISHED


def new_run(queue: str, data: dict[str, Any], *, job_id: str | None, due: datetime,
            now: datetime, priority: int, max_attempts: int, backoff: dict[str, Any],
            timeout: float | None, deadline: datetime | None,
            slot: str | None = None) -> dict[str, Any]:
    """A run document as `add` writes it: delayed or waiting by `due`."""
    doc: dict[str, Any] = {
        "_id": ObjectId(), "queue": queue, "jobId": job_id, "data": data,
        "state": "delayed" if due > now else "waiting", "priority": priority,
        "runAt": due, "attemptsMade": 0, "maxAttempts": max_attempts, "backoff": backoff,
        "timeout": timeout, "deadline": deadline, "createdAt": now, "attempts": [],
    }
    if job_id is not None:
        doc["key"] = dedupe_key(queue, job_id)
    if slot is not None:
        doc["slot"] = slot
    return doc


def _movable(doc: dict[str, Any]) -> dict[str, Any]:
    """What a new run hands a pending run of its job id that it replaces."""
    return {name: doc[name] for name in ("runAt", "data", "state", "priority", "deadline")}


def _create_index(
    collection: str, keys: list[tuple[str, int]], options: dict[str, Any]
) -> Callable[[Any], Awaitable[str]]:
    return lambda db: db[collection].create_index(keys, **options)


def _find_one(query: dict[str, Any]) -> Callable[[Any], Awaitable[dict[str, Any] | None]]:
    return lambda db: db[RUNS].find_one(query)


def _find_ids(query: dict[str, Any]) -> Callable[[Any], Awaitable[list[dict[str, Any]]]]:
    return lambda db: db[RUNS].find(query, {"_id": 1}).to_list(None)


def _page_of(query: dict[str, Any], projection: dict[str, Any], order: list[tuple[str, int]],
             limit: int) -> Callable[[Any], Awaitable[list[dict[str, Any]]]]:
    return lambda db: db[RUNS].find(query, projection).sort(order).limit(limit).to_list(limit)


def _add_minute(minute: datetime, inc: dict[str, int]) -> Callable[[Any], Awaitable[Any]]:
    # The id is the minute as text: a date as `_id` trips the embedded store's deletes.
    key = minute.astimezone(UTC).strftime("%Y-%m-%dT%H:%MZ")
    return lambda db: db[THROUGHPUT].update_one(
        {"_id": key}, {"$inc": inc, "$setOnInsert": {"minute": minute}}, upsert=True)


def _outcome_update(outcome: Outcome, owner: str, token: str) -> UpdateOne:
    """The write of one attempt's end: its fields, its attempt appended, the lease (and,
    if it finished, the job id's key) dropped, only while the run is still ours."""
    drop = _FINISHED_DROP if outcome.finishing else _LEASE_DROP
    fields = {k: v for k, v in outcome.fields.items() if k not in drop}
    return UpdateOne(
        {"_id": outcome.run_id, "state": "active", "leaseOwner": owner},
        {"$set": {**fields, "writeToken": token}, "$push": {"attempts": outcome.attempt},
         "$unset": dict(drop)})


# What an outcome unsets (`_outcome_update`), as `$unset` documents.
_LEASE_DROP = dict.fromkeys(sorted(LEASE_FIELDS), "")
_FINISHED_DROP = dict.fromkeys(sorted({*LEASE_FIELDS, "key"}), "")


def _update_many(query: dict[str, Any], update: Any) -> Callable[[Any], Awaitable[Any]]:
    return lambda db: db[RUNS].update_many(query, update)


def _oldest(query: dict[str, Any]) -> Callable[[Any], Awaitable[dict[str, Any] | None]]:
    return lambda db: db[RUNS].find_one(query, {"runAt": 1}, sort=[("runAt", ASCENDING)])


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _drop_index(name: str) -> Callable[[Any], Awaitable[Any]]:
    return lambda db: db[RUNS].drop_index(name)


def _increment(queue: str, inc: dict[str, int]) -> Callable[[Any], Awaitable[Any]]:
    return lambda db: db[QUEUES].update_one({"_id": queue}, {"$inc": inc}, upsert=True)


def _due_query(now: datetime) -> dict[str, Any]:
    """Runs that may start now: waiting, or delayed and due."""
    return {"$or": [{"state": "waiting"}, {"state": "delayed", "runAt": {"$lte": now}}]}


class RunStore:
    """All queries on runs and queue state. Methods map one-to-one to round trips
    unless their docstring says otherwise."""

    def __init__(self, mongo: Mongo, search_fields: Sequence[str] = ()) -> None:
        """`search_fields`: the data fields runs can be searched by (`search`), each with
        its own partial index."""
        for field in search_fields:
            if not SEARCH_FIELD.fullmatch(field):
                raise ValueError(f"not a searchable field name: {field!r}")
        self._mongo = mongo
        self.search_fields = tuple(search_fields)

    async def ensure_indexes(self) -> None:
        specs: list[tuple[list[tuple[str, int]], dict[str, Any]]] = [
            (
                [("queue", ASCENDING), ("state", ASCENDING), ("priority", DESCENDING),
                 ("runAt", ASCENDING)],
                {"name": "mwapjobs_claim"},
            ),
            # Promotion of due runs, and the due timer's pages in (runAt, _id) order.
            ([("state", ASCENDING), ("runAt", ASCENDING), ("_id", ASCENDING)],
             {"name": "mwapjobs_due_order"}),
            ([("state", ASCENDING), ("leaseUntil", ASCENDING)], {"name": "mwapjobs_lease"}),
            (  # history newest first; with _id, so retention's order is the index's
                [("queue", ASCENDING), ("state", ASCENDING), ("finishedAt", DESCENDING),
                 ("_id", DESCENDING)],
                {"name": "mwapjobs_history_order"},
            ),
            ([("key", ASCENDING)], {"name": "mwapjobs_dedupe", "unique": True, "sparse": True}),
            # One run per repeat occurrence, however often its fire is retried.
            ([("slot", ASCENDING)], {"name": "mwapjobs_slot", "unique": True, "sparse": True}),
            # Finding runs by job id in every state (the dedupe key is gone once finished).
            ([("jobId", ASCENDING), ("_id", DESCENDING)], {"name": "mwapjobs_job"}),
            *(([(f"data.{f}", ASCENDING), ("_id", DESCENDING)],
               {"name": search_index_name(f),
                "partialFilterExpression": {f"data.{f}": {"$exists": True}}})
              for f in self.search_fields),
        ]
        for keys, options in specs:
            await self._mongo.call(_create_index(RUNS, keys, options))
        await self.ensure_throughput_index()
        for replaced in ("mwapjobs_due", "mwapjobs_history"):  # by the *_order ones
            with contextlib.suppress(OperationFailure):
                await self._mongo.call(_drop_index(replaced))

    # -- adding ------------------------------------------------------------

    async def add(self, queue: str, data: dict[str, Any], *, job_id: str | None,
                  due: datetime, now: datetime, priority: int, max_attempts: int,
                  backoff: dict[str, Any], timeout: float | None,
                  deadline: datetime | None, slot: str | None = None,
                  replace: bool = False) -> tuple[dict[str, Any], bool]:
        """Write a new run (delayed or waiting by `due`), or find the pending run of its job
        id; with `replace`, a found run not yet started takes the new time and data.

        Returns (run, created)."""
        doc = new_run(queue, data, job_id=job_id, due=due, now=now, priority=priority,
                      max_attempts=max_attempts, backoff=backoff, timeout=timeout,
                      deadline=deadline, slot=slot)
        run, created = await self.insert(doc)
        if not created and replace and job_id is not None and (
                run["runAt"] != due or run["data"] != data):
            updated = await self.replace_pending(queue, job_id, _movable(doc))
            if updated is not None:
                run = updated
        return run, created

    async def insert(self, doc: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Insert a new run; if its `key` is pending already (or its `slot` was written
        before), return that run instead.

        Returns (run, created). Two round trips when deduplicated.
        """
        for _ in range(3):
            try:
                await self._mongo.call(lambda db: db[RUNS].insert_one(doc))
                return doc, True
            except DuplicateKeyError:
                pass
            for field in ("key", "slot"):
                if doc.get(field) is None:
                    continue
                existing = await self._mongo.call(_find_one({field: doc[field]}))
                if existing is not None:
                    return existing, False
            # The run holding the key or slot is gone meanwhile (finished, or trimmed).
        return doc, False  # a slot whose run is gone: that occurrence was done already

    # -- the engine's hot path --------------------------------------------

    async def promote_due(self, now: datetime) -> int:
        """Move every delayed run whose time has come to waiting, in one query."""
        result = await self._mongo.call(
            lambda db: db[RUNS].update_many(
                {"state": "delayed", "runAt": {"$lte": now}}, {"$set": {"state": "waiting"}}
            )
        )
        return int(result.modified_count)

    async def promote_matching(self, queue: str, data: dict[str, Any], now: datetime, *,
                               postponed_only: bool = False) -> int:
        """Make the delayed runs of `queue` whose data has these values waiting now (one
        query); with `postponed_only`, only those that were put back by `Postpone`."""
        query: dict[str, Any] = {"queue": queue, "state": "delayed",
                                 **{f"data.{k}": v for k, v in data.items()}}
        if postponed_only:
            query["attempts.outcome"] = "postponed"
        result = await self._mongo.call(
            lambda db: db[RUNS].update_many(query, {"$set": {"state": "waiting", "runAt": now}}))
        return int(result.modified_count)

    async def due_after(self, cursor: tuple[datetime, Any],
                        limit: int) -> list[tuple[datetime, Any, str]]:
        """(runAt, _id, queue) of up to `limit` delayed runs after `cursor` = (runAt, _id)
        in that order; with no `_id`, from that `runAt` on."""
        when, after_id = cursor
        query: dict[str, Any] = {"state": "delayed"}
        if after_id is None:
            query["runAt"] = {"$gte": when}
        else:
            query["$or"] = [{"runAt": {"$gt": when}}, {"runAt": when, "_id": {"$gt": after_id}}]
        docs: list[dict[str, Any]] = await self._mongo.call(
            lambda db: db[RUNS].find(query, {"runAt": 1, "queue": 1})
            .sort([("runAt", ASCENDING), ("_id", ASCENDING)]).limit(limit).to_list(limit)
        )
        return [(d["runAt"], d["_id"], d["queue"]) for d in docs]

    async def claim(
        self, queue: str, limit: int, owner: str, now: datetime, lease: float
    ) -> list[dict[str, Any]]:
        """Take up to `limit` runs that may start now, highest priority then oldest first;
        runs to be run alone (`isolate`) are left to `claim_isolated`.

        One round trip for a single run. Two per batch: read the candidates, then flip
        those still claimable to active under a batch token; a third reads back by
        token (among those ids) only if someone else took some of them in between.
        """
        query = {"queue": queue, "isolate": {"$ne": True}, **_due_query(now)}
        claimed = {"state": "active", "leaseOwner": owner,
                   "leaseUntil": now + timedelta(seconds=lease), "startedAt": now,
                   "claimToken": uuid.uuid4().hex}
        if limit == 1:  # one run: one round trip
            one: dict[str, Any] | None = await self._mongo.call(
                lambda db: db[RUNS].find_one_and_update(
                    query, {"$set": claimed, "$inc": {"attemptsMade": 1}},
                    sort=[("priority", DESCENDING), ("runAt", ASCENDING)],
                    return_document=ReturnDocument.AFTER))
            return [] if one is None else [one]
        candidates: list[dict[str, Any]] = await self._mongo.call(
            lambda db: db[RUNS]
            .find(query)
            .sort([("priority", DESCENDING), ("runAt", ASCENDING)])
            .limit(limit)
            .to_list(limit)
        )
        if not candidates:
            return []
        token = claimed["claimToken"]
        ids = [c["_id"] for c in candidates]
        result = await self._mongo.call(
            lambda db: db[RUNS].update_many(
                {"_id": {"$in": ids}, "isolate": {"$ne": True}, **_due_query(now)},
                {"$set": claimed, "$inc": {"attemptsMade": 1}},
            )
        )
        if result.modified_count != len(ids):
            mine: list[dict[str, Any]] = await self._mongo.call(
                lambda db: db[RUNS].find({"_id": {"$in": ids}, "claimToken": token})
                .to_list(None)
            )
            return mine
        for doc in candidates:
            doc.update(claimed)
            doc["attemptsMade"] = doc.get("attemptsMade", 0) + 1
        return candidates

    async def claim_isolated(self, queues: list[str], owner: str, now: datetime,
                             lease: float) -> dict[str, Any] | None:
        """Take the oldest run of `queues` that must run alone, if one may start now."""
        if not queues:
            return None
        return await self._mongo.call(
            lambda db: db[RUNS].find_one_and_update(
                {"queue": {"$in": queues}, "isolate": True, **_due_query(now)},
                {"$set": {"state": "active", "leaseOwner": owner,
                          "leaseUntil": now + timedelta(seconds=lease), "startedAt": now,
                          "claimToken": uuid.uuid4().hex},
                 "$inc": {"attemptsMade": 1}},
                sort=[("runAt", ASCENDING)], return_document=ReturnDocument.AFTER,
            )
        )

    async def has_isolated(self, queues: list[str]) -> bool:
        """Whether a run of `queues` waits to be run alone."""
        if not queues:
            return False
        doc = await self._mongo.call(
            lambda db: db[RUNS].find_one(
                {"queue": {"$in": queues}, "isolate": True,
                 "state": {"$in": ["waiting", "delayed"]}}, {"_id": 1}))
        return doc is not None

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

    async def taken_over(self, ids: list[ObjectId], owner: str) -> set[ObjectId]:
        """Which of our runs `ids` another process took back (after a renewal fell short):
        active under another owner, requeued by a recovery, or failed as stalled. Runs
        we finished meanwhile are not among them."""
        docs = await self._mongo.call(
            lambda db: db[RUNS].find({"_id": {"$in": ids}},
                                     {"state": 1, "leaseOwner": 1, "error.type": 1})
            .to_list(None))
        found = {d["_id"]: d for d in docs}
        return {i for i in ids if i not in found
                or (found[i]["state"] == "active" and found[i].get("leaseOwner") != owner)
                or found[i]["state"] == "waiting"
                or (found[i]["state"] == "failed"
                    and (found[i].get("error") or {}).get("type") == "Stalled")}

    async def write_outcomes(self, owner: str, outcomes: Sequence[Outcome],
                             token: str) -> set[ObjectId]:
        """Record the end of several attempts of our runs; returns the ids written.

        One ordered `bulk_write`, one round trip: an update per run, each only where the
        run is still ours, then the next runs that finishing outcomes carry
        (`Outcome.follow`), after the updates that free their job ids. A run written
        already by an earlier try with the same `token` counts as written; a second
        query reads those back only when the updates matched fewer runs than given.
        """
        if not outcomes:
            return set()
        ids = [o.run_id for o in outcomes]
        follows = [o.follow for o in outcomes if o.follow is not None]
        modified = await self._update_then_insert(
            [_outcome_update(o, owner, token) for o in outcomes], follows)
        if modified == len(ids):
            return set(ids)
        docs = await self._mongo.call(_find_ids({"_id": {"$in": ids}, "writeToken": token}))
        return {d["_id"] for d in docs}

    async def _update_then_insert(self, updates: list[Any], docs: list[dict[str, Any]]) -> int:
        """The `updates`, then insert `docs`, in one ordered round trip; returns how many
        documents the updates changed. A new run whose job id is pending already (added
        by someone meanwhile, or inserted by an earlier try of this very write) moves
        that run to its time and data instead, as `add(replace=True)`."""
        ops: list[Any] = [*updates, *(InsertOne(d) for d in docs)]
        try:
            result = await self._mongo.call(lambda db: db[RUNS].bulk_write(ops))
            return int(result.modified_count)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors") or []
            first = min((int(e["index"]) for e in errors), default=0)
            if first < len(updates) or any(e.get("code") != 11000 for e in errors):
                raise
            modified = int(exc.details.get("nModified") or 0)
        for doc in docs[first - len(updates):]:  # the refused one, and those after it
            _, created = await self.insert(doc)
            if not created and doc.get("jobId") is not None:
                await self.replace_pending(doc["queue"], doc["jobId"], _movable(doc))
        return modified

    async def release(self, ids: list[ObjectId], owner: str) -> int:
        """Give our unfinished active runs back (shutdown): waiting again, attempt refunded."""
        if not ids:
            return 0
        result = await self._mongo.call(
            lambda db: db[RUNS].update_many(
                {"_id": {"$in": ids}, "state": "active", "leaseOwner": owner},
                {
                    "$set": {"state": "waiting"},
                    "$unset": dict.fromkeys(LEASE_FIELDS, ""),
                    "$inc": {"attemptsMade": -1},
                },
            )
        )
        return int(result.modified_count)

    # -- crash recovery --------------------------------------------------------

    async def active_owners(self) -> set[str]:
        """Every process that holds an active run now (the lease index)."""
        owners = await self._mongo.call(
            lambda db: db[RUNS].distinct("leaseOwner", {"state": "active"}))
        return {str(o) for o in owners if o}

    async def expired_owners(self, now: datetime) -> set[str]:
        """Processes with an active run whose lease ran out: they died (or froze)."""
        owners = await self._mongo.call(
            lambda db: db[RUNS].distinct("leaseOwner",
                                         {"state": "active", "leaseUntil": {"$lt": now}}))
        return {str(o) for o in owners if o}

    async def expired_of(self, owner: str, now: datetime) -> list[ObjectId]:
        """The active runs of `owner` whose lease ran out."""
        docs = await self._mongo.call(
            lambda db: db[RUNS].find(
                {"state": "active", "leaseOwner": owner, "leaseUntil": {"$lt": now}},
                {"_id": 1}).to_list(None))
        return [d["_id"] for d in docs]

    async def active_of(self, owners: Iterable[str]) -> list[dict[str, Any]]:
        """The active runs of these (dead) processes."""
        found: list[dict[str, Any]] = await self._mongo.call(
            lambda db: db[RUNS].find(
                {"state": "active", "leaseOwner": {"$in": list(owners)}},
                {"data": 0, "attempts": 0, "result": 0}).to_list(None))
        return found

    async def recover(self, run: dict[str, Any], fields: dict[str, Any], *,
                      refund: bool, finished: bool) -> bool:
        """Take a dead process's active run back: set `fields` (its new state), drop the
        lease, refund the attempt that never finished, free the job id if it failed.

        The filter repeats the lease as read, so a worker that renewed meanwhile
        keeps its run.
        """
        unset = dict.fromkeys(LEASE_FIELDS, "")
        if finished:
            unset["key"] = ""
        update: dict[str, Any] = {"$set": fields, "$unset": unset}
        if refund:
            update["$inc"] = {"attemptsMade": -1}
        result = await self._mongo.call(
            lambda db: db[RUNS].update_one(
                {"_id": run["_id"], "state": "active", "leaseOwner": run.get("leaseOwner"),
                 "leaseUntil": run.get("leaseUntil")}, update))
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
        self, queue: str, state: State, skip: int, limit: int, now: datetime | None = None,
        total: int | None = None,
    ) -> list[dict[str, Any]]:
        """Runs of one queue and state, in the order an operator expects:
        finished ones newest first, pending ones in the order they will run.

        A page of finished runs is looked for among those finished in the last
        `HISTORY_WINDOWS[0]` seconds before `now`, then in wider windows, and in the
        whole history only if no window holds the page: a store that cannot walk the
        history index in order (the embedded store, some wire servers) sorts what the
        range holds, so without the window the first page would cost the whole history.
        The newest `skip + limit` runs of a window are those of any wider one, so a full
        page from a window is the page, and so is a window holding all `total` runs (the
        counters' count, when given). One query for a page of recent runs; each window
        tried costs one more."""
        if state not in FINISHED:
            order = [("priority", DESCENDING), ("runAt", ASCENDING)]
            return await self._find_page({"queue": queue, "state": state}, order, skip, limit)
        order = [("finishedAt", DESCENDING), ("_id", DESCENDING)]
        windows: list[float | None] = [*HISTORY_WINDOWS, None] if now is not None else [None]
        docs: list[dict[str, Any]] = []
        for window in windows:
            query: dict[str, Any] = {"queue": queue, "state": state}
            if window is not None and now is not None:
                query["finishedAt"] = {"$gte": now - timedelta(seconds=window)}
            docs = await self._find_page(query, order, skip, limit)
            if len(docs) >= limit or (total is not None and skip + len(docs) >= total):
                break
        return docs

    async def _find_page(self, query: dict[str, Any], order: list[tuple[str, int]],
                         skip: int, limit: int) -> list[dict[str, Any]]:
        return await self._mongo.call(
            lambda db: db[RUNS].find(query).sort(order).skip(skip).limit(limit).to_list(limit))

    async def search(self, search: RunSearch, skip: int,
                     limit: int) -> tuple[list[dict[str, Any]], int]:
        """A page of the runs `search` finds, in its index's order, and how many it finds
        in all (two round trips, both on the index: no scan of the history)."""
        if search.job_id is None and search.field is None:
            raise ValueError("a search needs a job id or a data field")
        if search.field is not None and search.field not in self.search_fields:
            raise ValueError(f"field must be one of {', '.join(self.search_fields) or '(none)'}")
        query = search.query()
        index = search.index()
        docs, total = await asyncio.gather(
            self._mongo.call(lambda db: db[RUNS].find(query).sort(search.order()).hint(index)
                             .skip(skip).limit(limit).to_list(limit)),
            self._mongo.call(lambda db: db[RUNS].count_documents(query, hint=index)))
        return docs, int(total)

    async def requeue(
        self, run_id: ObjectId, from_states: tuple[State, ...], key: str | None, now: datetime,
        reset: dict[str, Any],
    ) -> dict[str, Any] | None:
        """Move a run in one of `from_states` to waiting now (retry, promote).

        Raises JobIdTaken when re-pending it would collide with another pending run of
        the same job id.
        """
        update: dict[str, Any] = {"$set": {"state": "waiting", "runAt": now, **reset}}
        if key:
            update["$set"]["key"] = key
        try:
            return await self._mongo.call(
                lambda db: db[RUNS].find_one_and_update(
                    {"_id": run_id, "state": {"$in": list(from_states)}},
                    update,
                    return_document=ReturnDocument.AFTER,
                )
            )
        except DuplicateKeyError:
            raise JobIdTaken(key) from None

    async def latest_of(self, queue: str, job_id: str) -> dict[str, Any] | None:
        """The newest run of a job id, in any state (the job-id index: one key read)."""
        docs = await self._mongo.call(lambda db: db[RUNS].find(
            {"jobId": job_id, "queue": queue},
            {"state": 1, "createdAt": 1, "startedAt": 1, "finishedAt": 1, "slot": 1})
            .sort([("jobId", ASCENDING), ("_id", DESCENDING)]).hint("mwapjobs_job")
            .limit(1).to_list(1))
        return docs[0] if docs else None

    # -- bulk actions ------------------------------------------------------------

    async def failed_by_type(self, queue: str, as_of: datetime) -> dict[str, int]:
        """error type → failed runs of `queue` finished by `as_of` (one aggregation over
        the queue's failed range of the history index; failed history is bounded by
        `keep_failed`). Runs without an error type count under NO_ERROR_TYPE."""
        docs = await self._mongo.call(lambda db: db[RUNS].aggregate([
            {"$match": {"queue": queue, "state": "failed", "finishedAt": {"$lte": as_of}}},
            {"$group": {"_id": "$error.type", "n": {"$sum": 1}}},
        ]).to_list(None))
        out: dict[str, int] = {}
        for d in docs:
            name = d["_id"] if isinstance(d["_id"], str) and d["_id"] else NO_ERROR_TYPE
            out[name] = out.get(name, 0) + int(d["n"])
        return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))

    async def retry_failed(self, queue: str, error_type: str | None, as_of: datetime,
                           now: datetime, cap: int) -> dict[str, Any]:
        """Requeue the failed runs of `queue` (of `error_type`) finished by `as_of`, newest
        first, BULK_BATCH at a time: read a page of ids on the history index (after the
        previous page: no run is read twice), then flip them with updates that repeat
        `state: failed`, so a run retried or removed meanwhile is not touched.

        A run is skipped when its job id already has a pending run, or when a newer
        failed run of the same job id is retried in this call (one pending run per job
        id). Returns {retried, skipped, more}; `more` when `cap` runs were looked at and
        some may be left."""
        base: dict[str, Any] = {"queue": queue, "state": "failed",
                                "finishedAt": {"$lte": as_of}}
        if error_type is not None:
            base["error.type"] = None if error_type == NO_ERROR_TYPE else error_type
        reset = {"state": "waiting", "runAt": now, "attemptsMade": 0, "error": None,
                 "finishedAt": None, "stalledCount": 0}
        retried = skipped = seen = 0
        after: tuple[datetime, ObjectId] | None = None
        job_ids_done: set[str] = set()
        while seen < cap:
            query = dict(base)
            if after is not None:
                query["$or"] = [{"finishedAt": {"$lt": after[0]}},
                                {"finishedAt": after[0], "_id": {"$lt": after[1]}}]
            size = min(BULK_BATCH, cap - seen)
            page = await self._mongo.call(_page_of(
                query, {"jobId": 1, "finishedAt": 1},
                [("finishedAt", DESCENDING), ("_id", DESCENDING)], size))
            if not page:
                break
            seen += len(page)
            after = (page[-1]["finishedAt"], page[-1]["_id"])
            keyed = {d["_id"]: d["jobId"] for d in page if isinstance(d.get("jobId"), str)}
            keys = sorted({dedupe_key(queue, j) for j in keyed.values()})
            taken = set()
            if keys:
                held = await self._mongo.call(_page_of(
                    {"key": {"$in": keys}}, {"key": 1}, [("key", ASCENDING)], len(keys)))
                taken = {str(d["key"]).split(":", 1)[1] for d in held}
            plain = [d["_id"] for d in page if d["_id"] not in keyed]
            with_key: list[ObjectId] = []
            for run_id, job_id in keyed.items():
                if job_id in taken or job_id in job_ids_done:
                    skipped += 1
                    continue
                job_ids_done.add(job_id)
                with_key.append(run_id)
            if plain:
                retried += await self._modified(
                    {"_id": {"$in": plain}, "state": "failed"}, {"$set": reset})
            if with_key:
                try:
                    retried += await self._modified(
                        {"_id": {"$in": with_key}, "state": "failed"},
                        [{"$set": {**{k: {"$literal": v} for k, v in reset.items()},
                                   "key": {"$concat": [f"{queue}:", "$jobId"]}}}])
                except DuplicateKeyError:  # a run of one of these job ids was added meanwhile
                    for run_id in with_key:
                        try:
                            done = await self.requeue(run_id, ("failed",),
                                                      dedupe_key(queue, keyed[run_id]), now,
                                                      {k: v for k, v in reset.items()
                                                       if k not in ("state", "runAt")})
                        except JobIdTaken:
                            done = None
                        if done is None:
                            skipped += 1
                        else:
                            retried += 1
        more = seen >= cap and bool(await self._mongo.call(
            lambda db: db[RUNS].find_one(base, {"_id": 1})))
        return {"retried": retried, "skipped": skipped, "more": more}

    async def promote_all(self, queue: str, as_of: datetime, now: datetime,
                          cap: int) -> dict[str, Any]:
        """Make the delayed runs of `queue` created by `as_of` waiting now, BULK_BATCH at a
        time (ids read on the claim index, then flipped under `state: delayed`, so a run
        claimed or removed meanwhile is not touched). Returns {promoted, more}."""
        base = {"queue": queue, "state": "delayed", "createdAt": {"$lte": as_of}}
        promoted = seen = 0
        while seen < cap:
            size = min(BULK_BATCH, cap - seen)
            page = await self._mongo.call(_page_of(
                base, {"_id": 1}, [("priority", DESCENDING), ("runAt", ASCENDING)], size))
            if not page:
                break
            seen += len(page)
            promoted += await self._modified(
                {"_id": {"$in": [d["_id"] for d in page]}, "state": "delayed"},
                {"$set": {"state": "waiting", "runAt": now}})
        more = seen >= cap and bool(await self._mongo.call(
            lambda db: db[RUNS].find_one(base, {"_id": 1})))
        return {"promoted": promoted, "more": more}

    async def _modified(self, query: dict[str, Any], update: Any) -> int:
        result = await self._mongo.call(_update_many(query, update))
        return int(result.modified_count)

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

    async def delete_beyond(self, queue: str, state: State, keep: int) -> int:
        """Keep the newest `keep` finished runs of a queue and state, delete the rest.

        Two round trips whatever the history: find the newest run beyond `keep` (the
        history index, in its own order), then delete it and everything older in one
        range delete on the same index."""
        boundary: list[dict[str, Any]] = await self._mongo.call(
            lambda db: db[RUNS]
            .find({"queue": queue, "state": state}, {"_id": 1, "finishedAt": 1})
            .sort([("finishedAt", DESCENDING), ("_id", DESCENDING)])
            .skip(keep)
            .limit(1)
            .to_list(1)
        )
        if not boundary:
            return 0
        newest_gone = boundary[0]
        when = newest_gone.get("finishedAt")
        older: dict[str, Any] = {"queue": queue, "state": state}
        if isinstance(when, datetime):
            older["$or"] = [{"finishedAt": {"$lt": when}},
                            {"finishedAt": when, "_id": {"$lte": newest_gone["_id"]}},
                            {"finishedAt": None}]
        else:  # a run without finishedAt sorts last: only such runs can be older
            older["finishedAt"] = None
            older["_id"] = {"$lte": newest_gone["_id"]}
        result = await self._mongo.call(lambda db: db[RUNS].delete_many(older))
        return int(result.deleted_count)

    async def pending_by_job(self, queue: str,
                             job_ids: list[str] | None = None) -> dict[str, dict[str, Any]]:
        """jobId → {state, runAt, priority, deadline, data} of a queue's pending runs (all,
        or those of `job_ids`)."""
        query: dict[str, Any] = {"queue": queue, "state": {"$in": list(PENDING)}}
        if job_ids is not None:
            query["jobId"] = {"$in": job_ids}
        docs = await self._mongo.call(
            lambda db: db[RUNS].find(query, {"jobId": 1, "state": 1, "runAt": 1,
                                             "priority": 1, "deadline": 1, "data": 1})
            .to_list(None)
        )
        return {d["jobId"]: d for d in docs if d.get("jobId") is not None}

    async def delete_not_started(self, queue: str, job_id: str) -> dict[str, Any] | None:
        """Delete the delayed or waiting run of a job id; an active one is left alone."""
        key = dedupe_key(queue, job_id)
        return await self._mongo.call(
            lambda db: db[RUNS].find_one_and_delete(
                {"key": key, "state": {"$in": ["delayed", "waiting"]}}
            )
        )

    async def replace_pending(self, queue: str, job_id: str,
                              fields: dict[str, Any]) -> dict[str, Any] | None:
        """Update the not-yet-started run of a job id (new time or data); None if there is
        none, or it is already active."""
        key = dedupe_key(queue, job_id)
        return await self._mongo.call(
            lambda db: db[RUNS].find_one_and_update(
                {"key": key, "state": {"$in": ["delayed", "waiting"]}},
                {"$set": fields},
                return_document=ReturnDocument.AFTER,
            )
        )

    async def move_if_unchanged(self, seen: dict[str, Any],
                                fields: dict[str, Any]) -> dict[str, Any] | None:
        """Update a pending run read earlier (`seen`: its `_id` and `runAt`) if it is still
        as it was read: not started, and not moved or replaced since. One round trip; the
        filter repeats what was read, so a caller's stale view never overwrites a newer
        decision. None when it changed meanwhile (or is gone)."""
        return await self._mongo.call(
            lambda db: db[RUNS].find_one_and_update(
                {"_id": seen["_id"], "state": {"$in": ["delayed", "waiting"]},
                 "runAt": seen["runAt"]},
                {"$set": fields},
                return_document=ReturnDocument.AFTER,
            )
        )

    # -- history, for alert rules -------------------------------------------------

    async def count_finished_since(self, queue: str, state: State, since: datetime) -> int:
        """Runs of `queue` that ended in `state` at or after `since` (a range of the
        history index: it costs what is in the window, not the history)."""
        query: dict[str, Any] = {"queue": queue, "state": state, "finishedAt": {"$gte": since}}
        n = await self._mongo.call(lambda db: db[RUNS].count_documents(query))
        return int(n)

    async def oldest_waiting(self, queue: str) -> datetime | None:
        """The earliest `runAt` among the waiting runs of `queue`.

        The claim index orders by priority first, so this asks for the distinct
        priorities (a distinct scan), then the oldest run of each (one index look-up
        each); a run starved by higher priorities counts."""
        base: dict[str, Any] = {"queue": queue, "state": "waiting"}
        priorities: list[Any] = await self._mongo.call(
            lambda db: db[RUNS].distinct("priority", base))
        oldest: datetime | None = None
        for priority in priorities:
            doc = await self._mongo.call(_oldest({**base, "priority": priority}))
            run_at = doc.get("runAt") if doc else None
            if isinstance(run_at, datetime) and (oldest is None or _utc(run_at) < oldest):
                oldest = _utc(run_at)
        return oldest

    async def last_finished(self, queue: str, state: State) -> datetime | None:
        """When the newest run of `queue` in `state` finished (the history index)."""
        doc: dict[str, Any] | None = await self._mongo.call(
            lambda db: db[RUNS].find_one({"queue": queue, "state": state}, {"finishedAt": 1},
                                         sort=[("finishedAt", DESCENDING)]))
        finished = doc.get("finishedAt") if doc else None
        return _utc(finished) if isinstance(finished, datetime) else None

    # -- finished counts ---------------------------------------------------------

    async def finished_counts(self) -> dict[str, dict[str, int]]:
        """queue → {completed, failed}: counters kept with each transition (`bump`), so a
        count costs the same with a thousand finished runs or a million. One query."""
        docs = await self._mongo.call(
            lambda db: db[QUEUES].find({"counts": {"$exists": True}}, {"counts": 1})
            .to_list(None))
        return {str(d["_id"]): {s: int((d.get("counts") or {}).get(s) or 0) for s in FINISHED}
                for d in docs}

    async def bump(self, deltas: dict[tuple[str, State], int]) -> None:
        """Add to the finished counters: one update per queue."""
        by_queue: dict[str, dict[str, int]] = {}
        for (queue, state), n in deltas.items():
            if n:
                by_queue.setdefault(queue, {})[f"counts.{state}"] = n
        for queue, inc in by_queue.items():
            await self._mongo.call(_increment(queue, inc))

    # -- throughput: finished runs per minute and queue -----------------------------

    async def ensure_throughput_index(self) -> None:
        await self._mongo.call(_create_index(
            THROUGHPUT, [("minute", ASCENDING)],
            {"name": "mwapjobs_throughput_ttl",
             "expireAfterSeconds": int(THROUGHPUT_KEEP.total_seconds())}))

    async def bump_minutes(self, deltas: dict[tuple[datetime, str, State], int]) -> None:
        """Add to the per-minute counters: one upsert per minute (there is one document
        per minute, holding every queue's counts), so a flush costs one round trip
        whatever the number of queues."""
        by_minute: dict[datetime, dict[str, int]] = {}
        for (minute, queue, state), n in deltas.items():
            if n > 0:
                inc = by_minute.setdefault(minute, {})
                inc[f"q.{queue}.{state}"] = inc.get(f"q.{queue}.{state}", 0) + n
        for minute, inc in sorted(by_minute.items()):
            for attempt in range(2):
                try:
                    await self._mongo.call(_add_minute(minute, inc))
                    break
                except DuplicateKeyError:  # another instance inserted this minute first
                    if attempt:
                        raise

    async def throughput(self, since: datetime) -> dict[datetime, dict[str, dict[str, int]]]:
        """minute → queue → {completed, failed} from `since` on (one query on the TTL index,
        at most a minute's document per minute)."""
        docs = await self._mongo.call(lambda db: db[THROUGHPUT].find(
            {"minute": {"$gte": since}}).sort([("minute", ASCENDING)]).to_list(None))
        out: dict[datetime, dict[str, dict[str, int]]] = {}
        for d in docs:
            minute = d.get("minute")
            if isinstance(minute, datetime):
                out[_utc(minute)] = {str(q): {s: int(c.get(s) or 0) for s in FINISHED}
                                     for q, c in (d.get("q") or {}).items()
                                     if isinstance(c, dict)}
        return out

    async def prune_throughput(self, before: datetime) -> int:
        """Delete the minutes before `before` (what the TTL index does, for a store that
        has none: the embedded one)."""
        result = await self._mongo.call(
            lambda db: db[THROUGHPUT].delete_many({"minute": {"$lt": before}}))
        return int(result.deleted_count)

    async def init_counts(self, queue: str) -> bool:
        """Count a queue's finished runs once, if it has no counters yet (the first start
        of this version); the count reads the history index. True if it counted."""
        doc = await self._mongo.call(lambda db: db[QUEUES].find_one(
            {"_id": queue, "counts": {"$exists": True}}, {"_id": 1}))
        if doc is not None:
            return False
        counts = {state: await self.count(queue, state) for state in FINISHED}
        with contextlib.suppress(DuplicateKeyError):  # another instance counted first
            await self._mongo.call(lambda db: db[QUEUES].update_one(
                {"_id": queue, "counts": {"$exists": False}}, {"$set": {"counts": counts}},
                upsert=True))
        return True

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
