"""The embedded store's compiled filters (storage/embedded_match.py) answer exactly as
mongomock's `filter_applies`: every filter of a table against every document of a
table, raised errors included. And the engine's hot filters do compile (a matcher that
always deferred would pass the first test and speed nothing up)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from bson import ObjectId
from mongomock.filtering import filter_applies

from mwapjobs.storage import embedded_match
from mwapjobs.storage.embedded_match import compile_filter, matcher
from mwapjobs.storage.runs import _due_query

T = datetime(2026, 12, 1, 12, 0)  # as mongomock stores dates: naive UTC
A, B = ObjectId("6b0f4ed42629ff06acf7b8d0"), ObjectId("6b0f4ed42629ff06acf7b8d1")
PLAIN: list[Any] = [None, True, False, 0, 1, 1.0, 2, -1.5, float("nan"), "a", "b", "",
                    A, B, T, T + timedelta(seconds=1)]
ODD: list[Any] = [[1, 2], ["a"], [], [None], {"x": 1}, {}, b"a", T.replace(tzinfo=UTC)]
MISSING = object()

# The documents: field `a` holds each value (or is missing), `s` a sub-document whose
# `b` does (for dotted paths), or something a path cannot go through.
DOCUMENTS: list[dict[str, Any]] = (
    [{} if v is MISSING else {"a": v} for v in [MISSING, *PLAIN, *ODD]]
    + [{"s": {} if v is MISSING else {"b": v}} for v in [MISSING, *PLAIN, [1], {"c": 1}]]
    + [{"s": v} for v in [None, 1, "x", [{"b": 1}], [1]]]
    + [{"a": 1, "s": {"b": 2}, "state": "waiting"},
       {"a": "a", "state": "delayed", "runAt": T, "isolate": True}]
)


def conditions() -> list[Any]:
    out: list[Any] = [*PLAIN, [1, 2], {"x": 1}, {}]
    for op in ("$eq", "$ne", "$lt", "$lte", "$gt", "$gte"):
        out += [{op: v} for v in PLAIN]
    for op in ("$in", "$nin"):
        out += [{op: v} for v in ([], [None], [1, "a"], [1.0, A, T], [True], [None, 2],
                                  [[1, 2]], 5)]
    out += [{"$exists": True}, {"$exists": False}, {"$exists": 0},
            {"$gte": 0, "$lt": 2}, {"$ne": None, "$exists": True}, {"$ne": 1, "$gt": 0},
            {"$lte": T.replace(tzinfo=UTC)}, {"$foo": 1}, {"$not": {"$eq": 1}},
            {"$eq": [1]}, {"x": 1, "$eq": 1}]
    return out


CONDITIONS = conditions()
FILTERS: list[Any] = (
    [{"a": c} for c in CONDITIONS]
    + [{"s.b": c} for c in CONDITIONS]
    + [{"$or": [{"a": 1}, {"s.b": {"$exists": True}}]},
       {"$and": [{"a": {"$ne": None}}, {"a": {"$lt": 2}}]},
       {"$nor": [{"a": 1}, {"a": "a"}]},
       {"$or": []}, {"$and": {"a": 1}}, {"$or": [1]}, {"$where": "1"}, {"$comment": "x"},
       {"a": 1, "$comment": "x", "state": "waiting"}, {"": 1}, [("a", 1)],
       {"isolate": {"$ne": True}, **_due_query(T)},
       {"queue": "q", "isolate": {"$ne": True}, **_due_query(T)}]
)


def outcome(call: Any) -> Any:
    try:
        return ("=", call())
    except Exception as exc:
        return ("raised", type(exc))


def same(x: Any, y: Any) -> bool:
    return x == y or (x[0] == "=" and y[0] == "=" and x[1] != x[1] and y[1] != y[1])


@pytest.mark.parametrize("query", FILTERS, ids=repr)
def test_answers_are_mongomocks(query: Any) -> None:
    match = matcher(query)
    wrong = []
    for document in DOCUMENTS:
        got = outcome(lambda d=document: match(d))
        expected = outcome(lambda d=document: filter_applies(query, d))
        if not same(got, expected):
            wrong.append((document, got, expected))
    assert not wrong, wrong[:5]


def test_the_engines_filters_compile_and_plain_documents_do_not_defer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    deferred = []
    monkeypatch.setattr(embedded_match, "_applies",
                        lambda q, d: deferred.append(d) or filter_applies(q, d))
    owner = "host:1:abc"
    hot = [
        {"queue": "q", "isolate": {"$ne": True}, **_due_query(T)},  # the claim
        {"isolate": {"$ne": True}, **_due_query(T)},  # the claim's update (ids apart)
        {"_id": A, "state": "active", "leaseOwner": owner},  # an outcome
        {"state": "active", "leaseOwner": owner},  # a renewal (ids apart)
        {"state": "delayed", "runAt": {"$lte": T}},  # a promotion
        {"queue": {"$in": ["q", "r"]}, "isolate": True,
         "state": {"$in": ["waiting", "delayed"]}},
    ]
    runs = [{"_id": oid, "queue": q, "state": s, "runAt": T + timedelta(seconds=d),
             "leaseOwner": owner, "priority": 0, "isolate": i,
             "data": {"n": 1}, "attempts": [{"attempt": 1}]}
            for oid, q, s, d, i in itertools.product(
                [A, B], ["q", "r"], ["waiting", "delayed", "active", "completed"],
                [-1, 0, 1], [False, True])]
    for query in hot:
        assert compile_filter(query) is not None, query
        match = matcher(query)
        assert [match(r) for r in runs] == [filter_applies(query, r) for r in runs], query
    assert deferred == []  # `data` and `attempts` are sub-documents, but not filtered on


def test_a_document_with_an_array_in_a_filtered_field_defers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    deferred = []
    monkeypatch.setattr(embedded_match, "_applies",
                        lambda q, d: deferred.append(d) or filter_applies(q, d))
    match = matcher({"tags": "a"})
    assert match({"tags": ["a", "b"]}) is True  # an array matches by its elements
    assert match({"tags": "b"}) is False
    assert deferred == [{"tags": ["a", "b"]}]
