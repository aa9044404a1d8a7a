"""The embedded store's indexes (storage/embedded.py) pick candidates only: every answer
must be plain mongomock's, in the same order. Checked here against an unindexed twin
on random runs, with the engine's own query shapes (the claim's page above all)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import mongomock
import pytest
from bson import ObjectId
from pymongo import UpdateOne

from mwapjobs.storage import embedded
from mwapjobs.storage.embedded import index_collection
from mwapjobs.storage.mongo import (
    EMBEDDED_INDEXES,
    EMBEDDED_ORDERED_ONLY,
    EMBEDDED_PAGE_LEADS,
)
from mwapjobs.storage.names import RUNS

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def twins(n: int, seed: int, priorities: Sequence[Any] = (0, 0, 0, 5, -1),
          missing: float = 0.2) -> tuple[Any, Any]:
    """The same runs in an indexed collection (as the daemon's) and in a plain one."""
    rng = random.Random(seed)
    indexed = mongomock.MongoClient(tz_aware=True).db[RUNS]
    plain = mongomock.MongoClient(tz_aware=True).db[RUNS]
    specs, ordered = EMBEDDED_INDEXES[RUNS]
    index_collection(indexed, specs, ordered, EMBEDDED_PAGE_LEADS[RUNS],
                     EMBEDDED_ORDERED_ONLY[RUNS])
    for i in range(n):
        doc = {"_id": i, "queue": rng.choice(["a", "b"]),
               "state": rng.choice(["waiting", "delayed", "active", "completed"]),
               "priority": rng.choice(priorities),
               "runAt": T0 + timedelta(seconds=rng.choice([-30, -5, 0, 0, 10, 60])),
               "isolate": rng.random() < 0.1, "data": {"i": i}}
        if rng.random() < missing:
            del doc["priority"]  # missing fields sort first, as in MongoDB
        indexed.insert_one(dict(doc))
        plain.insert_one(dict(doc))
    return indexed, plain


def due(queue: str, now: datetime) -> dict[str, Any]:
    return {"queue": queue, "isolate": {"$ne": True},
            "$or": [{"state": "waiting"}, {"state": "delayed", "runAt": {"$lte": now}}]}


ORDER = [("priority", -1), ("runAt", 1)]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_page_is_plain_mongomocks_page(seed: int) -> None:
    indexed, plain = twins(400, seed)
    for query, sort, skip, limit in [
        (due("a", T0), ORDER, 0, 100),
        (due("b", T0), ORDER, 0, 1),
        (due("a", T0 + timedelta(seconds=30)), ORDER, 5, 20),
        ({"queue": "a", "state": "completed"}, [("runAt", -1), ("_id", -1)], 10, 25),
        ({"queue": "b", "state": {"$in": ["waiting", "delayed"]}}, [("runAt", 1)], 0, 1000),
        ({"_id": {"$in": [3, 1, 2, 99, 250]}}, [("priority", 1)], 0, 3),
    ]:
        got = list(indexed.find(query, {"data": 0}).sort(sort).skip(skip).limit(limit))
        want = list(plain.find(query, {"data": 0}).sort(sort).skip(skip).limit(limit))
        assert got == want and got, (query, sort, skip, limit)
        assert all("data" not in d for d in got)
        assert all(d["runAt"].tzinfo is not None for d in got)


PAGES: list[tuple[Any, Any, int, int]] = [
    (due("a", T0), ORDER, 0, 100),
    (due("b", T0), ORDER, 0, 1),
    (due("a", T0 + timedelta(seconds=30)), ORDER, 5, 20),
    ({"queue": "b", "state": {"$in": ["waiting", "delayed"]}}, [("runAt", 1)], 0, 1000),
    ({"state": "delayed", "runAt": {"$lte": T0}}, [("runAt", 1)], 0, 7),
    ({"queue": "a", "$or": [{"state": "waiting"}, {"state": "waiting", "isolate": True}]},
     ORDER, 0, 50),  # two branches read one group: each run once
]


@pytest.mark.parametrize("priorities", [(0,), (3, 3.0), (0, 1)], ids=repr)
def test_a_page_read_in_index_order_is_plain_mongomocks(priorities: Sequence[Any]) -> None:
    """With one priority in a group, a claim's page is read from the ordered index
    (only as far as it needs); with several, or after writes, still mongomock's page."""
    indexed, plain = twins(400, 5, priorities, missing=0)
    indexes = embedded._indexes(indexed._store)
    assert indexes is not None
    read_in_order = indexes.in_sort_order(due("a", T0), ORDER) is not None
    assert read_in_order == (len(set(priorities)) == 1)
    rng = random.Random(6)
    for step in range(60):
        for query, sort, skip, limit in PAGES:
            got = list(indexed.find(query).sort(sort).skip(skip).limit(limit))
            want = list(plain.find(query).sort(sort).skip(skip).limit(limit))
            assert got == want, (step, query, sort)
        i = rng.randrange(420)
        change = rng.choice([
            {"$set": {"state": rng.choice(["waiting", "delayed", "active"])}},
            {"$set": {"runAt": T0 + timedelta(seconds=rng.randint(-40, 40))}},
            {"$set": {"priority": rng.choice([*priorities, True, "x"])}},
            {"$unset": {"priority": ""}},
            {"$set": {"queue": rng.choice(["a", "b"]), "isolate": False}},
        ])
        delete = rng.random() < 0.1
        for coll in (indexed, plain):
            if delete:
                coll.delete_one({"_id": i})
            elif i >= 400:
                coll.insert_one({"_id": i, "queue": "a", "state": "waiting", "isolate": False,
                                 "priority": priorities[0], "runAt": T0})
            else:
                coll.update_one({"_id": i}, change)


def test_the_page_follows_writes() -> None:
    indexed, plain = twins(200, 4)
    for coll in (indexed, plain):
        coll.update_many({"queue": "a", "state": "waiting"}, {"$set": {"state": "active"}})
        coll.insert_one({"_id": 1000, "queue": "a", "state": "waiting", "priority": 9,
                         "runAt": T0, "isolate": False})
        coll.delete_many({"queue": "a", "state": "delayed", "runAt": {"$lt": T0}})
    got = list(indexed.find(due("a", T0)).sort(ORDER).limit(10))
    assert got == list(plain.find(due("a", T0)).sort(ORDER).limit(10))
    assert got[0]["_id"] == 1000


def test_a_page_filters_and_copies_only_what_it_returns(
        monkeypatch: pytest.MonkeyPatch) -> None:
    indexed, _ = twins(0, 5)
    indexed.insert_many([{"_id": i, "queue": "a", "state": "waiting", "priority": 0,
                          "runAt": T0 + timedelta(microseconds=i), "isolate": False}
                         for i in range(5000)])
    filtered = 0
    matcher = embedded.matcher

    def counting(spec: Any) -> Callable[[Any], bool]:
        match = matcher(spec)

        def count(doc: Any) -> bool:
            nonlocal filtered
            filtered += 1
            return match(doc)

        return count

    monkeypatch.setattr(embedded, "matcher", counting)
    page = list(indexed.find(due("a", T0)).sort(ORDER).limit(100))
    assert [d["_id"] for d in page] == list(range(100))
    assert filtered == 100  # not the 5,000 candidates
    rest = list(indexed.find(due("a", T0)))  # no page: mongomock's way, every match
    assert len(rest) == 5000


def test_a_cursor_read_twice_gives_the_same_page() -> None:
    indexed, plain = twins(300, 6)
    cursor = indexed.find(due("a", T0)).sort(ORDER).limit(7)
    first = list(cursor)
    cursor.rewind()
    assert list(cursor) == first == list(plain.find(due("a", T0)).sort(ORDER).limit(7))


def test_null_keys_are_not_indexed_and_still_found() -> None:
    """Runs without a job id, dedupe key or claim token (most of them) keep no index
    entry for those fields; a query for null there is answered by mongomock's scan."""
    indexed, plain = twins(50, 7)
    for coll in (indexed, plain):
        coll.insert_one({"_id": 500, "queue": "a", "state": "waiting", "jobId": "j1",
                         "key": "a:j1", "runAt": T0})
        coll.update_one({"_id": 3}, {"$set": {"claimToken": "t3"}})
        coll.update_one({"_id": 3}, {"$unset": {"claimToken": ""}})
    for query in ({"jobId": None}, {"jobId": "j1"}, {"key": {"$in": ["a:j1", None]}},
                  {"claimToken": "t3"}, {"claimToken": None, "queue": "b"}):
        got = list(indexed.find(query).sort([("_id", 1)]))
        assert got == list(plain.find(query).sort([("_id", 1)])), query
        assert indexed.count_documents(query) == plain.count_documents(query), query
    assert [d["_id"] for d in indexed.find({"jobId": "j1"})] == [500]
    assert indexed.count_documents({"claimToken": "t3"}) == 0
    entries = indexed._store._mwapjobs_index._entries
    assert None not in entries[("jobId",)] and (None,) not in entries[("jobId",)]


def test_a_date_range_reads_only_the_runs_in_range() -> None:
    """mongomock stores dates naive (it drops the zone): the ordered index still keeps
    them, so a range of finish times picks only the runs finished in it."""
    indexed, _ = twins(0, 6)
    indexed.insert_many([{"_id": i, "queue": "a", "state": "completed",
                          "finishedAt": T0 - timedelta(seconds=i)} for i in range(1000)])
    query = {"queue": "a", "state": "completed", "finishedAt": {"$gte": T0 - timedelta(seconds=9)}}
    indexes = embedded._indexes(indexed._store)
    assert indexes is not None
    assert indexes.candidates(query) == set(range(10))
    page = list(indexed.find(query).sort([("finishedAt", -1)]).limit(5))
    assert [d["_id"] for d in page] == [0, 1, 2, 3, 4]


def update_twins(n: int, seed: int) -> tuple[Any, Any, list[Any]]:
    """Twins with ObjectId ids and a partial unique index, as the runs collection has."""
    rng = random.Random(seed)
    ids = [ObjectId() for _ in range(n)]
    pair = (mongomock.MongoClient(tz_aware=True).db[RUNS],
            mongomock.MongoClient(tz_aware=True).db[RUNS])
    specs, ordered = EMBEDDED_INDEXES[RUNS]
    index_collection(pair[0], specs, ordered, EMBEDDED_PAGE_LEADS[RUNS],
                     EMBEDDED_ORDERED_ONLY[RUNS])
    for coll in pair:
        coll.create_index("slot", unique=True,
                          partialFilterExpression={"slot": {"$exists": True}})
        coll.create_index("key", unique=True, sparse=True)  # as the dedupe key's
    for i, _id in enumerate(ids):
        doc = {"_id": _id, "queue": rng.choice(["a", "b"]),
               "state": rng.choice(["waiting", "delayed", "active"]),
               "runAt": T0 + timedelta(seconds=rng.choice([-5, 0, 10])),
               "attemptsMade": rng.choice([0, 1]), "attempts": rng.choice([[], [{"n": 1}]]),
               "data": {"i": i}}
        for coll in pair:
            coll.insert_one(dict(doc))
    return pair[0], pair[1], ids


def random_update(rng: random.Random, ids: list[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    query: dict[str, Any] = rng.choice([
        {"_id": {"$in": rng.sample(ids, rng.randint(1, 12))}},
        {"_id": rng.choice(ids), "state": rng.choice(["waiting", "active"])},
        {"_id": {"$in": rng.sample(ids, 5)}, "state": "active", "leaseOwner": "me"},
        {"queue": rng.choice(["a", "b"]), "state": "delayed",
         "runAt": {"$lte": T0 + timedelta(seconds=rng.choice([0, 10]))}},
    ])
    update: dict[str, Any] = {}
    if rng.random() < 0.8:
        update["$set"] = {k: v for k, v in rng.sample([
            ("state", rng.choice(["active", "completed", "waiting"])),
            ("leaseOwner", "me"),
            ("leaseUntil", T0 + timedelta(microseconds=rng.randint(0, 10**6))),
            ("error", {"type": "E", "at": T0}), ("slot", f"s{rng.randint(0, 3)}"),
            ("key", f"k{rng.randint(0, 2)}"),
            ("runAt", datetime(2026, 12, 1, 13, 0))], rng.randint(1, 3))}
    if rng.random() < 0.4:
        update["$inc"] = {"attemptsMade": rng.choice([1, -1, 0])}
    if rng.random() < 0.3:
        update["$unset"] = {rng.choice(["leaseOwner", "claimToken", "missing", "key",
                                        "slot"]): ""}
    if rng.random() < 0.3:
        update["$push"] = {"attempts": {"n": rng.randint(1, 9), "at": T0}}
    if not update or rng.random() < 0.05:
        update = rng.choice([{"$set": {"a.b": 1}}, {"$max": {"attemptsMade": 3}},
                             [{"$set": {"state": "waiting"}}], {"$set": {"_id": ids[0]}}])
    return query, update


def outcome(call: Any) -> Any:
    try:
        result = call()
    except Exception as exc:
        return type(exc).__name__
    return (result.matched_count, result.modified_count) if hasattr(result, "matched_count") \
        else result


@pytest.mark.parametrize("seed", range(6))
def test_updates_change_what_plain_mongomock_changes(seed: int) -> None:
    """The fast path for simple updates (`embedded._update`): the same documents, the
    same counts, the same errors (a duplicate slot, a changed `_id`), and indexes that
    still find every document afterwards."""
    indexed, plain, ids = update_twins(120, seed)
    rng = random.Random(seed)
    for _ in range(300):
        query, update = random_update(rng, ids)
        how = rng.choice(["update_one", "update_many", "find_one_and_update"])
        results = [outcome(lambda c=c, h=how, q=query, u=update: getattr(c, h)(q, u))
                   for c in (indexed, plain)]
        assert results[0] == results[1], (how, query, update)
    assert list(indexed.find().sort("_id")) == list(plain.find().sort("_id"))
    for query in [due("a", T0), {"state": "active"}, {"slot": "s1"},
                  {"queue": "b", "state": "delayed", "runAt": {"$lte": T0}}]:
        assert list(indexed.find(query).sort("_id")) == list(plain.find(query).sort("_id"))


def bulk_outcome(coll: Any, requests: list[Any]) -> Any:
    try:
        return coll.bulk_write(requests).bulk_api_result
    except mongomock.BulkWriteError as exc:
        return "BulkWriteError", exc.details
    except Exception as exc:
        return type(exc).__name__


@pytest.mark.parametrize("seed", range(4))
def test_a_bulk_of_updates_changes_what_plain_mongomock_changes(seed: int) -> None:
    """A bulk of plain `UpdateOne`s (the engine's outcomes: `embedded._bulk_write`)
    gives plain mongomock's result, or its error with the same details (the updates
    before the failing one applied, none after it), and leaves the same documents."""
    indexed, plain, ids = update_twins(120, seed + 20)
    rng = random.Random(seed)
    for _ in range(150):
        requests = [UpdateOne(*random_update(rng, ids)) for _ in range(rng.randint(1, 6))]
        if rng.random() < 0.1:  # not plain: mongomock's own bulk
            requests.append(UpdateOne({"_id": rng.choice(ids)}, {"$set": {"x": 1}},
                                      upsert=True))
        results = [bulk_outcome(c, requests) for c in (indexed, plain)]
        assert results[0] == results[1], requests
    assert list(indexed.find().sort("_id")) == list(plain.find().sort("_id"))
    for query in [due("a", T0), {"state": "active"}, {"slot": "s1"}, {"key": "k1"}]:
        assert list(indexed.find(query).sort("_id")) == list(plain.find(query).sort("_id"))


def test_an_update_mongomock_refuses_half_way_leaves_the_indexes_true() -> None:
    """mongomock applies an update field by field and raises at an `$inc` of a string
    or a `$push` onto one, keeping what it changed before: the indexes must follow."""
    indexed, plain, ids = update_twins(10, 9)
    for coll in (indexed, plain):
        coll.update_one({"_id": ids[0]}, {"$set": {"attemptsMade": "two", "attempts": "x"}})
    for update in ({"$set": {"state": "completed"}, "$inc": {"attemptsMade": 1}},
                   {"$set": {"queue": "c"}, "$push": {"attempts": {"n": 2}}}):
        errors = [outcome(lambda c=c, u=update: c.update_one({"_id": ids[0]}, u))
                  for c in (indexed, plain)]
        assert errors[0] == errors[1] and isinstance(errors[0], str), errors
    assert indexed.find_one({"_id": ids[0]}) == plain.find_one({"_id": ids[0]})
    for query in [{"queue": "c", "state": "completed"}, {"state": "completed"}]:
        assert list(indexed.find(query)) == list(plain.find(query))


def test_a_unique_index_made_after_writes_is_enforced_by_the_next_one() -> None:
    """The fields unique indexes read are kept between writes (`_unique_fields`): an
    index created or dropped afterwards is seen by the next write all the same."""
    indexed, plain = twins(20, 8)
    for coll in (indexed, plain):
        coll.update_one({"_id": 1}, {"$set": {"tag": "x"}})  # read the (no) unique fields
        coll.create_index("tag", unique=True, sparse=True)
    for coll in (indexed, plain):
        with pytest.raises(mongomock.DuplicateKeyError):
            coll.update_one({"_id": 2}, {"$set": {"tag": "x"}})
        assert coll.find_one({"_id": 2}).get("tag") is None
        coll.drop_index("tag_1")
        coll.update_one({"_id": 2}, {"$set": {"tag": "x"}})  # no index now: allowed
        assert coll.count_documents({"tag": "x"}) == 2
