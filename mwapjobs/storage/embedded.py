"""The embedded store (`MONGODB_URI=memory://`): mongomock, with the lookups a real
server answers from an index answered from one here too.

mongomock scans every document for every query (`Collection._iter_documents`), and
its unique-index checks do too, so a queue of N runs costs O(N) per query and O(N^2)
per burst. `index_collection` attaches to a collection's data a set of hash indexes
(`_id` is free: the data is a dict keyed by it); a query whose filter pins an indexed
field (equality or `$in`, also in every branch of an `$or`) then only looks at the
documents with those values. The filter is still applied to each of them, so the
answer is exactly mongomock's (and in the same order): the index only picks the
candidates, which makes it safe even where it is imprecise. An index may also keep
its documents ordered by one more field (a date: `runAt`, `finishedAt`), in the groups
where that date is read (waiting and delayed runs for `runAt`), so that a range on it
(`runAt <= now`) reads only the documents in range. `count_documents` of a
filter that is nothing but an indexed equality is answered from the index's size.

A page (`find(...).sort(...).limit(k)`, the claim of a batch of runs) is computed the
other way round: the candidates are sorted first, then filtered only until the page is
full, and only the page's documents are copied. mongomock filters and copies every
match before it sorts and cuts the page, so a claim of 100 runs in a burst of 10,000
cost 10,000 filters and copies. Stable sorting and filtering commute, so the page is
the same documents in the same order. Where an ordered index holds the sort's order
already (a claim's `priority, runAt` when a queue's runs share one priority, counted
per group), the page is read from it lazily and sorts nothing: 100 claims of a burst
of 10,000 had sorted 500,000 runs. Filters are applied by `embedded_match.matcher`,
mongomock's answers compiled once per query.

Updates of indexed collections made only of `$set`, `$unset`, `$inc` and a plain
`$push` on top-level fields (every claim, renewal and outcome of a run) are applied
here (`_update`): mongomock deep-copies and deep-compares each whole document it
updates, and checks every unique index on each, which made a claim of 200 runs cost
200 µs a run. The old values of the touched fields restore a document here, because
only top-level values are replaced, never mutated; unique indexes are checked when a
field they read changed. A batch of outcomes (`bulk_write` of plain `UpdateOne`s) goes
to `_update` one by one without mongomock's bulk builder (`_bulk_write`). A filter's
`_id` equality or `$in` picks the candidates by hash and is not checked again against
each of them (a claim compared every run with every id).

The indexes stay current through the few places where mongomock changes data: its
store's `__setitem__` (inserts, rollbacks) and `__delitem__` (deletes), the two
methods that update a stored document in place (even when they raise half-way, as
mongomock does on an `$inc` of a string, keeping what it changed), and `_update`.
These are patched once, at class level, and do nothing more for collections without
indexes. mongomock is pinned
below 5 (`pyproject.toml`); tests/test_embedded.py checks the answers against plain
mongomock.
"""

from __future__ import annotations

import copy
import functools
import heapq
import itertools
import operator
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import mongomock.collection
import mongomock.results
import mongomock.store
from bson import BSON, ObjectId
from mongomock import DuplicateKeyError, helpers
from mongomock.filtering import filter_applies, resolve_sort_key
from pymongo import UpdateOne
from pymongo.errors import BulkWriteError, WriteError  # (mongomock raises these, with pymongo)
from sortedcontainers import SortedList

from .embedded_match import matcher

_ATTR = "_mwapjobs_index"
_UNIQUE_ATTR = "_mwapjobs_unique_fields"  # (the indexes dict read, `_unique_fields`)
_MAX_COMBINATIONS = 64  # values of an `$in` (times another's) worth a lookup


class _Unhashable(Exception):
    pass


_HASHABLE = frozenset({str, int, float, bool, type(None), ObjectId, datetime})


def _key(value: Any) -> Any:
    """A value as an index key; arrays and documents are not indexed (see `_wild`)."""
    if type(value) in _HASHABLE:  # most are: no `hash` to try
        return value
    if isinstance(value, list | dict):
        raise _Unhashable
    try:
        hash(value)
    except TypeError:
        raise _Unhashable from None
    return value


def _field(doc: dict[str, Any], name: str) -> Any:
    if "." not in name:
        return doc.get(name)
    value: Any = doc
    for part in name.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


class HashIndexes:
    """Hash indexes over some fields (or field tuples) of one collection's documents,
    and, per index in `ordered`, the same groups ordered by a date field."""

    def __init__(self, specs: Sequence[tuple[str, ...]],
                 ordered: Sequence[tuple[tuple[str, ...], str]] = (),
                 lead: tuple[str, tuple[tuple[str, ...], str]] | None = None,
                 only: Mapping[tuple[tuple[str, ...], str], tuple[str, Iterable[Any]]]
                 | None = None) -> None:
        """`lead`: (a field, an index of `ordered`): pages may sort by the field before
        the index's date (the runs' `priority`, then `runAt`); its values are counted
        per group of that index, so a page of groups where it is one value is read in
        the index's order (`in_sort_order`). `only`: per index of `ordered`, (a field of
        its spec, values): the groups it keeps in order (the runs' `runAt` matters while
        they wait, `finishedAt` once finished); a query of other groups is answered
        without it, and a write there moves nothing in it."""
        self.specs = sorted({*specs, *(spec for spec, _ in ordered)}, key=len, reverse=True)
        # Every set and ordered entry holds documents by their insertion rank, an int:
        # mongomock's order is insertion order, so sorting ranks is sorting documents,
        # and an int hashes in C where an ObjectId's `__hash__` is a Python call (it was
        # a quarter of the store's time in a burst, five lookups per candidate per claim).
        self._entries: dict[tuple[str, ...], dict[Any, set[int]]] = {
            s: {} for s in self.specs}
        self.ordered = list(ordered)
        self._sorted: dict[tuple[tuple[str, ...], str], dict[Any, SortedList[Any]]] = {
            o: {} for o in self.ordered}
        # rank -> its key per spec (None: not indexed, every field null or missing) and
        # its entry per ordered index (None: no date), tuples aligned with `specs` and
        # `ordered`: a run of 100,000 pays for each of these, so they are kept small.
        self._keys: dict[int, tuple[Any, ...]] = {}
        self._dates: dict[int, tuple[Any, ...]] = {}
        self._spec_at = {spec: i for i, spec in enumerate(self.specs)}
        # Per ordered index, in order: its date field, where its spec's key is in a
        # document's keys, and its groups (what `put` reads for every write).
        self._ordered_at = [(field, self._spec_at[spec], self._sorted[(spec, field)])
                            for spec, field in self.ordered]
        # Per ordered index: None (every group), or where the field of `only` is in its
        # spec's key and the values kept.
        self._only: list[tuple[int, frozenset[Any]] | None] = [
            (spec.index(rule[0]), frozenset(rule[1])) if rule else None
            for spec, field in self.ordered
            for rule in [(only or {}).get((spec, field))]]
        self.lead: str | None = lead[0] if lead else None
        self._led = self.ordered.index(lead[1]) if lead else -1  # the index it leads
        # Per group of that index: how many of its dated documents have each value of
        # the lead; and per rank, the value counted.
        self._leads: dict[Any, Counter[Any]] = {}
        self._lead_of: dict[int, Any] = {}
        self._fields = sorted({f for spec in self.specs for f in spec} | (
            {self.lead} if self.lead else set()))
        # What `put` reads: where each spec's fields are in `_fields`, each spec's
        # entries (aligned with `specs`), where the lead is, whether no field is dotted.
        self._picks = [tuple(self._fields.index(f) for f in spec) for spec in self.specs]
        self._entry_list = [self._entries[spec] for spec in self.specs]
        self._none: tuple[None, ...] = (None,) * len(self.specs)
        self._lead_at = self._fields.index(self.lead) if self.lead else -1
        self._flat = all("." not in f for f in self._fields)
        self._wild: set[int] = set()  # documents with an array or document in a field
        self._rank: dict[Any, int] = {}  # _id -> insertion rank
        self._id_at: dict[int, Any] = {}  # insertion rank -> _id
        self._next = itertools.count()

    # -- upkeep --------------------------------------------------------------

    def put(self, doc: dict[str, Any]) -> None:
        """Index `doc` (new, or changed in place): only the entries whose key or date
        changed move, so an update that touches no indexed field costs a comparison."""
        _id = doc.get("_id")
        rank = self._rank.get(_id)
        if rank is None:
            rank = self._rank[_id] = next(self._next)
            self._id_at[rank] = _id
        # Each field once, then each spec's key from them (C-level loops where it can:
        # this runs twice per run in a burst, for a claim and an outcome).
        values = (list(map(doc.get, self._fields)) if self._flat
                  else [_field(doc, f) for f in self._fields])
        for v in values:
            if type(v) not in _HASHABLE:
                try:
                    _key(v)
                except _Unhashable:
                    self._unindex(rank)
                    self._wild.add(rank)
                    return
        keys = tuple([k if k.count(None) != len(k) else None  # `_indexed`
                      for k in [tuple([values[p] for p in pick]) for pick in self._picks]])
        self._wild.discard(rank)
        old_keys = self._keys.get(rank)
        old_dates = self._dates.get(rank, ())
        if old_keys != keys:
            for old, key, entries in zip(old_keys or self._none, keys, self._entry_list,
                                         strict=True):
                if old == key:
                    continue
                if old is not None:
                    ranks = entries.get(old)
                    if ranks is not None:
                        ranks.discard(rank)
                        if not ranks:
                            del entries[old]
                if key is not None:
                    ranks = entries.get(key)
                    if ranks is None:
                        entries[key] = {rank}
                    else:
                        ranks.add(rank)
        self._keys[rank] = keys
        dates: list[Any] = []
        lead_value = _lead_key(values[self._lead_at]) if self.lead else None
        old_lead = self._lead_of.get(rank)
        for j, (field, at, groups) in enumerate(self._ordered_at):
            when = doc.get(field) if "." not in field else _field(doc, field)
            key = keys[at]
            entry = None
            rule = self._only[j]
            if key is not None and isinstance(when, datetime) and (
                    rule is None or key[rule[0]] in rule[1]):
                entry = (when if when.tzinfo is None else _utc_naive(when), rank)
            old_entry = old_dates[j] if j < len(old_dates) else None
            old_key = old_keys[at] if old_keys is not None else None
            if entry != old_entry or key != old_key:
                if old_entry is not None and old_key in groups:
                    groups[old_key].discard(old_entry)
                if entry is not None:
                    group = groups.get(key)
                    if group is None:
                        group = groups[key] = SortedList()
                    group.add(entry)
            if j == self._led and ((entry is None) != (old_entry is None)
                                   or key != old_key or lead_value != old_lead):
                leads = self._leads
                if old_entry is not None:
                    _uncount(leads, old_key, old_lead)
                if entry is not None:
                    counts = leads.get(key)
                    if counts is None:
                        counts = leads[key] = Counter()
                    counts[lead_value] += 1
            dates.append(entry)
        if self.lead:
            self._lead_of[rank] = lead_value
        if any(entry is not None for entry in dates):
            self._dates[rank] = tuple(dates)
        else:
            self._dates.pop(rank, None)

    def _unlist(self, spec: tuple[str, ...], key: Any, rank: int) -> None:
        ranks = self._entries[spec].get(key)
        if ranks is not None:
            ranks.discard(rank)
            if not ranks:
                del self._entries[spec][key]

    def drop(self, _id: Any) -> None:
        """The document is gone: forget it, its rank too."""
        rank = self._rank.pop(_id, None)
        if rank is not None:
            self._unindex(rank)
            self._wild.discard(rank)
            del self._id_at[rank]

    def _unindex(self, rank: int) -> None:
        keys = self._keys.pop(rank, None)
        lead_value = self._lead_of.pop(rank, None)
        if keys is None:
            return
        for j, ((spec, field), entry) in enumerate(zip(self.ordered, self._dates.pop(rank, ()),
                                                       strict=False)):
            key = keys[self._spec_at[spec]]
            group = self._sorted[(spec, field)].get(key)
            if group is not None and entry is not None:
                group.discard(entry)
                if j == self._led:
                    _uncount(self._leads, key, lead_value)
        for spec, key in zip(self.specs, keys, strict=True):
            if key is not None:
                self._unlist(spec, key, rank)

    def clear(self) -> None:
        for entries in self._entries.values():
            entries.clear()
        for groups in self._sorted.values():
            groups.clear()
        self._leads.clear()
        self._lead_of.clear()
        self._dates.clear()
        self._keys.clear()
        self._wild.clear()
        self._rank.clear()
        self._id_at.clear()

    # -- lookups ---------------------------------------------------------------

    def candidates(self, query: Any) -> set[int] | None:
        """The ranks of a superset of the documents `query` can match (see `in_order`),
        or None if no index narrows it down."""
        if not isinstance(query, dict):
            return None
        ids = _values(query.get("_id")) if "_id" in query else None
        if ids is not None:
            rank = self._rank
            return {rank[i] for i in ids if i in rank}
        for spec, field in self.ordered:  # a range on an ordered field: only the range
            found = self._range(spec, field, query)
            if found is not None:
                return found | self._wild
        for spec in self.specs:
            found = self._lookup(spec, query)
            if found is not None:
                return found | self._wild
        branches = query.get("$or")
        if isinstance(branches, list) and branches:
            rest = {k: v for k, v in query.items() if k != "$or"}
            union: set[int] = set()
            for branch in branches:
                found = self.candidates({**rest, **branch}) if isinstance(branch, dict) \
                    else None
                if found is None:
                    return None
                union |= found
            return union
        clauses = query.get("$and")
        if isinstance(clauses, list):
            for clause in clauses:
                found = self.candidates(clause)
                if found is not None:
                    return found
        return None

    def _lookup(self, spec: tuple[str, ...], query: dict[str, Any]) -> set[int] | None:
        combos = _combos(spec, query)
        if combos is None:
            return None
        entries = self._entries[spec]
        found: set[int] = set()
        for combo in combos:
            found |= entries.get(combo, set())
        return found

    def _range(self, spec: tuple[str, ...], field: str,
               query: dict[str, Any]) -> set[int] | None:
        bounds = _date_bounds(query.get(field))
        if bounds is None:
            return None
        combos = _combos(spec, query)
        if combos is None or not self._keeps(spec, field, combos):
            return None
        low, high = bounds
        found: set[int] = set()
        groups = self._sorted[(spec, field)]
        for combo in combos:
            group = groups.get(combo)
            if group:
                start = 0 if low is None else group.bisect_left((low,))
                stop = len(group) if high is None else group.bisect_right((high, _TOP))
                found.update(map(_rank_of, group.islice(start, stop)))
        return found

    def _keeps(self, spec: tuple[str, ...], field: str,
               combos: list[tuple[Any, ...]]) -> bool:
        """Whether the ordered index (`spec`, `field`) keeps all these groups."""
        rule = self._only[self.ordered.index((spec, field))]
        return rule is None or all(combo[rule[0]] in rule[1] for combo in combos)

    def exact_count(self, query: Any) -> int | None:
        """The number of matches of a query that is exactly an indexed equality."""
        if not isinstance(query, dict) or self._wild:
            return None
        for spec in self.specs:
            if set(query) == set(spec) and all(
                    not isinstance(query[f], dict | list) for f in spec):
                try:
                    key = _indexed(tuple(_key(query[f]) for f in spec))
                except _Unhashable:
                    return None
                if key is None:
                    return None
                return len(self._entries[spec].get(key, ()))
        return None

    def in_order(self, ranks: Iterable[int]) -> list[Any]:
        """The `_id`s of `candidates`, in mongomock's order (insertion order)."""
        return list(map(self._id_at.__getitem__, sorted(ranks)))

    def in_sort_order(self, query: Any, sort: list[tuple[str, int]]) -> Iterator[Any] | None:
        """The `_id`s of a superset of `query`'s matches in the order mongomock sorts
        them by `sort` (ties in insertion order), read lazily from an ordered index, or
        None if none serves. One serves a sort by its date ascending, led by `lead` if
        that is one value in every group read, when the query pins the index's fields
        (in every `$or` branch), with at most a range on the date: a claim's page then
        reads the runs it returns, not every due run."""
        if self._wild or not isinstance(query, dict):
            return None
        if len(sort) == 2 and self.lead and sort[0][0] == self.lead:
            sort = sort[1:]
            led = True
        else:
            led = False
        if len(sort) != 1 or sort[0][1] != 1:
            return None
        for j, (spec, field) in enumerate(self.ordered):
            if field != sort[0][0] or (led and j != self._led):
                continue
            slices = self._slices(spec, field, query)
            if slices is None:
                continue
            groups = self._sorted[(spec, field)]
            entries = self._entries[spec]
            seen: set[Any] = set()
            streams = []
            for key, low, high in slices:
                group = groups.get(key)
                if len(entries.get(key, ())) != len(group or ()):
                    return None  # some of its documents have no date: not all in order
                if not group:
                    continue
                if led:
                    seen.update(self._leads[key])
                    if len(seen) > 1 or _ODD in seen:
                        return None  # the lead orders them first
                start = 0 if low is None else group.bisect_left((low,))
                stop = len(group) if high is None else group.bisect_right((high, _TOP))
                streams.append(group.islice(start, stop))
            ranks: Iterator[int] = map(_rank_of, heapq.merge(*streams) if len(streams) > 1 else
                        itertools.chain.from_iterable(streams))
            if len({key for key, _, _ in slices}) < len(slices):
                ranks = _unique(ranks)  # two branches read one group
            return map(self._id_at.__getitem__, ranks)
        return None

    def _slices(self, spec: tuple[str, ...], field: str,
                query: dict[str, Any]) -> list[tuple[Any, Any, Any]] | None:
        """(group key, low, high) of each group of the ordered index (`spec`, `field`)
        that `query` may match in, and the bounds of its date there; None if the query
        does not pin `spec` or bounds the date otherwise than by a range."""
        if "_id" in query:
            return None
        branches = query.get("$or")
        if branches is not None:
            if not isinstance(branches, list) or not branches:
                return None
            rest = {k: v for k, v in query.items() if k != "$or"}
            out: list[tuple[Any, Any, Any]] = []
            for branch in branches:
                found = self._slices(spec, field, {**rest, **branch}) \
                    if isinstance(branch, dict) else None
                if found is None:
                    return None
                out += found
            return out
        combos = _combos(spec, query)
        if combos is None or not self._keeps(spec, field, combos):
            return None
        low = high = None
        if field in query:
            bounds = _date_bounds(query[field])
            if bounds is None:
                return None
            low, high = bounds
        return [(combo, low, high) for combo in combos]


_ODD = object()  # a lead that is not a number: BSON's order is not Python's then


def _lead_key(value: Any) -> Any:
    """The lead as counted: numbers by value (0 and 0.0 sort as one), anything else
    (a boolean, null, a string) as `_ODD`, which no page is read in index order for."""
    return value if type(value) in (int, float) else _ODD


def _uncount(leads: dict[Any, Counter[Any]], key: Any, value: Any) -> None:
    counts = leads.get(key)
    if counts is not None:
        counts[value] -= 1
        if counts[value] <= 0:
            del counts[value]
        if not counts:
            del leads[key]


def _unique(ranks: Iterable[int]) -> Iterator[int]:
    seen: set[int] = set()
    for rank in ranks:
        if rank not in seen:
            seen.add(rank)
            yield rank


_TOP = float("inf")  # sorts after every insertion rank at the same date
_rank_of = operator.itemgetter(1)  # of an ordered entry (date, rank)
_applies: Callable[[Any, Any], bool] = filter_applies
_sort_key: Callable[[str, Any], Any] = resolve_sort_key
_aware: Callable[[Any], Any] = helpers.make_datetime_timezone_aware_in_document
_stored_dates: Callable[[Any], Any] = helpers.patch_datetime_awareness_in_document
_copy_field: Callable[[Any, type], Any] = mongomock.collection._copy_field
_UTC: Any = helpers.utc  # type: ignore[attr-defined]  # the zone mongomock hands dates out in


def _combos(spec: tuple[str, ...], query: dict[str, Any]) -> list[tuple[Any, ...]] | None:
    """The index keys a query pins for `spec` (every field equal to one value or one of
    an `$in`), or None if it does not pin them all, or pins too many."""
    per_field: list[list[Any]] = []
    for name in spec:
        values = _values(query[name]) if name in query else None
        if values is None:
            return None
        per_field.append(values)
    combos = list(itertools.islice(itertools.product(*per_field), _MAX_COMBINATIONS + 1))
    if len(combos) > _MAX_COMBINATIONS or any(_indexed(c) is None for c in combos):
        return None  # too many, or null everywhere: such documents are not indexed
    return combos


def _indexed(key: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """A key as the index keeps it: None (not indexed) when every field is null or
    missing, as most runs' `key`, `slot` and `jobId` are."""
    return None if key.count(None) == len(key) else key


def _date_bounds(condition: Any) -> tuple[datetime | None, datetime | None] | None:
    """(low, high) of a condition made only of date comparisons (inclusive bounds, a
    superset for strict ones), or None."""
    if isinstance(condition, datetime):
        return (_utc_naive(condition),) * 2
    if not isinstance(condition, dict) or not condition:
        return None
    low = high = None
    for op, value in condition.items():
        if not isinstance(value, datetime):
            return None
        value = _utc_naive(value)
        if op in ("$gt", "$gte"):
            low = value if low is None else max(low, value)
        elif op in ("$lt", "$lte"):
            high = value if high is None else min(high, value)
        else:
            return None
    return low, high


def _utc_naive(value: datetime) -> datetime:
    """A date as mongomock stores it: naive UTC (it drops the zone of what it is given,
    and hands dates back aware only on the way out). The ordered indexes keep and
    compare every date so; an index that kept only aware ones kept none."""
    return value if value.tzinfo is None else value.astimezone(UTC).replace(tzinfo=None)


def _values(condition: Any) -> list[Any] | None:
    """The values an equality or `$in` condition allows, or None for anything else."""
    try:
        if isinstance(condition, dict):
            if set(condition) == {"$eq"}:
                return [_key(condition["$eq"])]
            if set(condition) == {"$in"} and isinstance(condition["$in"], list):
                return [_key(v) for v in condition["$in"]]
            return None
        return [_key(condition)]
    except _Unhashable:
        return None


# -- hooks into mongomock ---------------------------------------------------------------


def _indexes(store: Any) -> HashIndexes | None:
    indexes: HashIndexes | None = getattr(store, _ATTR, None)
    return indexes


_Collection: Any = mongomock.collection.Collection
_Store: Any = mongomock.store.CollectionStore
_Cursor: Any = mongomock.collection.Cursor
_original_compute = _Cursor._compute_results
_original_count = _Collection.count_documents
_original_update_doc = _Collection._apply_update_document
_original_update = _Collection._update
_original_update_pipeline = _Collection._apply_update_pipeline
_original_setitem = _Store.__setitem__
_original_delitem = _Store.__delitem__
_original_drop = _Store.drop
_original_create_index = _Store.create_index
_original_drop_index = _Store.drop_index
_original_bulk_write = _Collection.bulk_write
_validate_update: Callable[[Any], None] = mongomock.collection.validate_ok_for_update
_BulkWriteResult: Any = mongomock.results.BulkWriteResult  # type: ignore[attr-defined]
_Bulk: Any = mongomock.collection.BulkOperationBuilder
_original_add_update = _Bulk.add_update
_original_add_replace = _Bulk.add_replace


def _iter_documents(self: Any, filter: Any) -> Iterator[dict[str, Any]]:
    indexes = _indexes(self._store)
    if indexes is not None and type(filter) is dict and type(filter.get("_id")) in _EXACT_IDS:
        # One document by its `_id` (an outcome's write): no candidate set to sort.
        document = self._store._documents.get(filter["_id"])
        if document is None:
            _applies(filter, {})
        elif matcher(_beyond_ids(filter))(document):
            yield document
        return
    ids = indexes.candidates(filter) if indexes is not None else None
    if indexes is None or ids is None:  # every document, as mongomock's own does
        if self._store.is_empty:
            _applies(filter, {})  # still refuse a malformed filter, as mongomock does
        match = matcher(filter)
        yield from (d for d in list(self._store.documents) if match(d))
        return
    if not ids:
        _applies(filter, {})
    documents = self._store._documents
    match = matcher(_beyond_ids(filter))
    for _id in indexes.in_order(ids):
        document = documents.get(_id)
        if document is not None and match(document):
            yield document


_EXACT_IDS = (ObjectId, str)  # types whose Python equality and hash are BSON's


def _beyond_ids(filter: dict[str, Any]) -> dict[str, Any]:
    """The filter without its `_id` condition when the candidates were picked by that
    very condition (an equality or `$in` of ObjectIds or strings, looked up by hash):
    mongomock would check each document's `_id` against every value of the `$in` again,
    200 comparisons per document for a claim of 200 runs."""
    values = _values(filter.get("_id")) if "_id" in filter else None
    if values is None or not all(type(v) in _EXACT_IDS for v in values):
        return filter
    return {k: v for k, v in filter.items() if k != "_id"}


def _by(key: str, document: dict[str, Any]) -> Any:
    return _sort_key(key, document)


_PLAIN = ({int}, {float}, {int, float}, {str}, {datetime})
_MISSING = object()


def _plain_values(dataset: list[dict[str, Any]], key: str) -> list[Any] | None:
    """The values of a top-level field, if every document has one and all are of one
    simple type (numbers, strings or dates), whose Python order is BSON's."""
    if "." in key:
        return None
    values = list(map(operator.methodcaller("get", key, _MISSING), dataset))
    return values if set(map(type, values)) in _PLAIN else None


def _page(collection: Any, indexes: HashIndexes, spec: Any, sort: Any,
          skip: int, limit: int) -> list[dict[str, Any]] | None:
    """Documents `skip` to `skip + limit` of `find(spec).sort(sort)`, as mongomock's
    `_get_dataset` would give them, without filtering or copying the rest; None when
    the indexes do not narrow the query down (mongomock's own way then)."""
    order = [(key, direction) for key, direction in (
        sort.items() if isinstance(sort, dict) else sort)]
    wanted = skip + limit
    documents = collection._store._documents
    in_order = indexes.in_sort_order(spec, order)
    if in_order is not None:  # read in the sort's order, only until the page is full
        return _first_matches(spec, map(documents.get, in_order), wanted)[skip:]
    ids = indexes.candidates(spec)
    if ids is None:
        return None
    # map() and the C slots below, not comprehensions: a claim's page looks at every due
    # run, and per-candidate bytecode was most of its cost.
    dataset = [d for d in map(documents.get, indexes.in_order(ids)) if d is not None]
    for key, direction in reversed(order):
        if key == "$natural":
            if direction < 0:
                dataset.reverse()
            continue
        if key.startswith("$"):
            return None  # mongomock refuses it: let it say so
        plain = _plain_values(dataset, key)
        if plain is not None:  # one simple type: its own order is BSON's, and cheaper
            try:
                positions = sorted(range(len(dataset)), key=plain.__getitem__,
                                   reverse=direction < 0)
                dataset = list(map(dataset.__getitem__, positions))
                continue
            except TypeError:  # naive and aware datetimes, say: BSON's comparison then
                pass
        dataset.sort(key=functools.partial(_by, key), reverse=direction < 0)
    return _first_matches(spec, dataset, wanted)[skip:]


def _first_matches(spec: Any, documents: Iterable[dict[str, Any] | None],
                   wanted: int) -> list[dict[str, Any]]:
    """The first `wanted` of `documents` (in order; None: deleted meanwhile) that match
    `spec`, looking no further."""
    match = matcher(spec)
    page: list[dict[str, Any]] = []
    looked = False
    for document in documents:
        looked = True
        if document is not None and match(document):
            page.append(document)
            if len(page) >= wanted:
                break
    if not looked:
        _applies(spec, {})  # still refuse a malformed filter, as mongomock does
    return page


def _compute_results(self: Any, with_limit_and_skip: bool = False) -> list[dict[str, Any]]:
    indexes = _indexes(self.collection._store)
    if not with_limit_and_skip or not self._limit or not self._sort or indexes is None:
        return list(_original_compute(self, with_limit_and_skip))
    cached = getattr(self, "_mwapjobs_page", None)
    if cached is not None and cached[0] is self._factory:  # __next__ asks once per document
        return cached[1]  # type: ignore[no-any-return]
    page = _page(self.collection, indexes, self._spec, self._sort, self._skip,
                 abs(self._limit))
    if page is None:
        return list(_original_compute(self, with_limit_and_skip))
    aware = self.collection.codec_options.tz_aware
    fields = self._projection
    if fields is None or not fields:  # the whole document (pymongo 4: also for {})
        page = [_copy_out(d, aware) for d in page]
    else:
        page = [self.collection._copy_only_fields(d, fields, dict) for d in page]
        if aware:
            page = [_aware(d) for d in page]
    self._mwapjobs_page = (self._factory, page)
    return page


_IMMUTABLE = frozenset({str, int, float, bool, type(None), ObjectId, bytes})


def _copy_out(value: Any, aware: bool) -> Any:
    """A stored document as mongomock hands it out: copied (`_copy_field`), its dates
    made aware if the client is tz-aware (`make_datetime_timezone_aware_in_document`),
    in one pass, and without `copy.copy` of every immutable value."""
    kind = type(value)
    if kind in _IMMUTABLE:
        return value
    if kind is dict:  # (immutable values inline: most are, and a call each was most)
        return {k: v if type(v) in _IMMUTABLE else _copy_out(v, aware)
                for k, v in value.items()}
    if kind is list:
        return [v if type(v) in _IMMUTABLE else _copy_out(v, aware) for v in value]
    if kind is datetime:
        return value.replace(tzinfo=_UTC) if aware else value
    copied = _copy_field(value, dict)
    return _aware(copied) if aware else copied


def _stored(value: Any) -> Any:
    """`patch_datetime_awareness_in_document` (dates as mongomock stores them: naive
    UTC, milliseconds), by type rather than by `isinstance` chains; anything but plain
    dicts, lists, dates and immutable scalars goes to mongomock's own."""
    kind = type(value)
    if kind in _IMMUTABLE:
        return value
    if kind is dict:
        return {k: v if type(v) in _IMMUTABLE else _stored(v) for k, v in value.items()}
    if kind is list:
        return [v if type(v) in _IMMUTABLE else _stored(v) for v in value]
    if kind is datetime:
        mongo_us = (value.microsecond // 1000) * 1000
        tz = value.tzinfo
        if tz is UTC:  # the engine's clock: no offset to take away
            return value.replace(tzinfo=None, microsecond=mongo_us)
        if tz:
            return (value - value.utcoffset()).replace(tzinfo=None, microsecond=mongo_us)
        return value.replace(microsecond=mongo_us)
    return _stored_dates(value)


def _count_documents(self: Any, filter: Any, **kwargs: Any) -> int:
    indexes = _indexes(self._store)
    if indexes is not None and not kwargs:
        count = indexes.exact_count(filter)
        if count is not None:
            return count
    result: int = _original_count(self, filter, **kwargs)
    return result


def _apply_update_document(self: Any, existing: dict[str, Any], *args: Any) -> None:
    try:
        _original_update_doc(self, existing, *args)
    finally:  # an update that fails half-way (mongomock raises) leaves what it changed
        _reindex(self, existing)


def _apply_update_pipeline(self: Any, existing: dict[str, Any], *args: Any) -> None:
    try:
        _original_update_pipeline(self, existing, *args)
    finally:
        _reindex(self, existing)


def _reindex(collection: Any, existing: dict[str, Any]) -> None:
    """A stored document was changed in place: index it as it is now. Not if it is not
    the one stored under its `_id` (an upsert's new document, or an update that changed
    `_id`, which mongomock then refuses and rolls back)."""
    indexes = _indexes(collection._store)
    if indexes is not None and collection._store._documents.get(
            existing.get("_id")) is existing:
        indexes.put(existing)


_SIMPLE = frozenset({"$set", "$unset", "$inc", "$push"})


def _simple_update(document: Any) -> dict[str, dict[str, Any]] | None:
    """The update document, datetimes as mongomock stores them, if it only sets, unsets,
    increments or pushes one value onto top-level fields, each named once; else None
    (mongomock's own path then)."""
    if type(document) is not dict or not document:
        return None
    parts = []
    for op, fields in document.items():
        if type(fields) is not dict:
            return None
        parts.append((op, *fields))
    shape = tuple(parts)
    simple = _SHAPES.get(shape)
    if simple is None:
        simple = _simple_shape(document)
        if len(_SHAPES) >= _KEEP_SHAPES:
            _SHAPES.clear()
        _SHAPES[shape] = simple
    if not simple:
        return None
    for value in document.get("$inc", {}).values():
        if type(value) is bool or not isinstance(value, int | float):
            return None
    for value in document.get("$push", {}).values():
        if isinstance(value, dict) and any(str(k).startswith("$") for k in value):
            return None  # $each, $slice, ...
    patched: dict[str, dict[str, Any]] = _stored(document)
    if "$set" in patched or "$push" in patched:
        BSON.encode({**patched.get("$set", {}), **patched.get("$push", {})})  # as mongomock
    return patched


# Whether an update's operators and field names (its shape) are simple, by shape: the
# engine writes a handful of shapes, each thousands of times in a burst.
_KEEP_SHAPES = 256
_SHAPES: dict[tuple[tuple[Any, ...], ...], bool] = {}


def _simple_shape(document: dict[Any, Any]) -> bool:
    """Only `_SIMPLE` operators, each on a non-empty document (`_simple_update` saw that
    they are documents) of top-level field names, each named once, none of them `_id`."""
    if not set(document) <= _SIMPLE:
        return False
    seen: set[str] = set()
    for fields in document.values():
        if not isinstance(fields, dict) or not fields:
            return False
        for name in fields:
            if (not isinstance(name, str) or not name or name in seen or name == "_id"
                    or "." in name or "$" in name or "\0" in name):
                return False
            seen.add(name)
    return True


def _own(value: Any) -> Any:
    """A value for one document: containers are never shared between documents."""
    return copy.deepcopy(value) if isinstance(value, dict | list) else value


def _applies_simply(document: dict[str, Any], update: dict[str, dict[str, Any]]) -> bool:
    """False where mongomock must say what happens: an `$inc` of a non-number, a
    `$push` onto a non-array."""
    return (all(not isinstance(v, bool) and isinstance(v, int | float)
                for v in (document.get(name, 0) for name in update.get("$inc", {})))
            and all(isinstance(document.get(name, []), list) for name in update.get("$push", {})))


def _apply_simple(document: dict[str, Any], update: dict[str, dict[str, Any]],
                  share: bool) -> None:
    """Apply a `_simple_update` in place (`_applies_simply` said it can); replaced values
    are never mutated, so the touched fields' old values restore the document. `share`:
    this is the update's only document, which may keep its values (`_simple_update`
    made them fresh) instead of a deep copy each."""
    own = _keep if share else _own
    sets = update.get("$set")
    if sets:
        if share or all(type(v) in _SHAREABLE for v in sets.values()):
            document.update(sets)  # nothing to copy: in C
        else:
            for name, value in sets.items():
                document[name] = own(value)
    for name in update.get("$unset", {}):
        document.pop(name, None)
    for name, value in update.get("$inc", {}).items():
        document[name] = document.get(name, 0) + value
    for name, value in update.get("$push", {}).items():
        document[name] = [*document.get(name, []), own(value)]


_SHAREABLE = _IMMUTABLE | {datetime}  # values two documents may hold as one object


def _keep(value: Any) -> Any:
    return value


def _unique_fields(collection: Any) -> tuple[set[str], set[str]]:
    """`_read_unique_fields`, kept with the store until its indexes change (every write
    asked, and reading a dozen index documents each time was a tenth of a claim)."""
    store = collection._store
    cached = getattr(store, _UNIQUE_ATTR, None)
    if cached is not None and cached[0] is store.indexes:  # (replaced by drop_indexes)
        return cached[1]  # type: ignore[no-any-return]
    fields = _read_unique_fields(collection)
    setattr(store, _UNIQUE_ATTR, (store.indexes, fields))
    return fields


def _read_unique_fields(collection: Any) -> tuple[set[str], set[str]]:
    """The top-level fields a unique index of the collection reads (its key and partial
    filter): a write that changes none of them cannot break uniqueness; and those of
    them whose removal can (a key of an index that is not sparse, where a missing value
    is a null like another's, or a field of a partial filter). Removing the key of a
    sparse index only takes the document out of it, as an outcome frees its dedupe key."""
    fields: set[str] = set()
    removal: set[str] = set()

    def names(expression: Any) -> None:
        if isinstance(expression, dict):
            for key, value in expression.items():
                if not str(key).startswith("$"):
                    fields.add(str(key).split(".")[0])
                    removal.add(str(key).split(".")[0])
                names(value)
        elif isinstance(expression, list):
            for item in expression:
                names(item)

    for index in collection._store.indexes.values():
        if index.get("unique"):
            keys = {str(key).split(".")[0] for key, _ in index.get("key", ())}
            fields.update(keys)
            if not index.get("sparse"):
                removal.update(keys)
            names(index.get("partialFilterExpression"))
    return fields, removal


def _update(self: Any, spec: Any, document: Any, upsert: bool = False,
            manipulate: bool = False, multi: bool = False, check_keys: bool = False,
            **options: Any) -> dict[str, Any]:
    """mongomock's `_update` for the updates the engine makes on every run (claim,
    renewal, outcome: `$set`/`$unset`/`$inc`/`$push` on top-level fields), without its
    deep copy and deep comparison of each whole document: the touched fields' old values
    tell whether it changed and restore it, as only top-level values are replaced.
    Anything else (upserts,
    pipelines, replacements, dotted or positional paths, options) is mongomock's."""
    indexes = _indexes(self._store)
    update = (_simple_update(document) if indexes is not None and not upsert
              and not any(options.values()) and isinstance(spec, dict) else None)
    spec = _stored(spec)
    # (This module's `_iter_documents`, not the collection's attribute: mongomock-motor
    # wraps that per collection to rebuild every filter for beanie's string fields.)
    matches = (list(itertools.islice(_iter_documents(self, spec), None if multi else 1))
               if update is not None else [])
    if indexes is None or update is None or not all(
            _applies_simply(d, update) for d in matches):
        result: dict[str, Any] = _original_update(
            self, spec, document, upsert, manipulate, multi, check_keys, **options)
        return result
    touched = tuple({name: None for fields in update.values() for name in fields})
    unique, removal = _unique_fields(self)
    removed = update.get("$unset", {})  # (a field unset is one touched)
    check_unique = bool(unique.intersection(touched).difference(removed)
                        or removal.intersection(removed))
    modified = 0
    missing = itertools.repeat(_MISSING)
    for existing in matches:
        # Only the touched fields change: what they held is enough to tell whether the
        # document changed, and to restore it. (map and list equality: loops in C.)
        before = list(map(existing.get, touched, missing))
        _apply_simple(existing, update, share=len(matches) == 1)
        if list(map(existing.get, touched, missing)) == before:
            continue
        indexes.put(existing)  # before the unique check: it looks through the indexes
        if check_unique:
            try:
                self._ensure_uniques(existing)
            except DuplicateKeyError:
                for name, old in zip(touched, before, strict=True):
                    if old is _MISSING:
                        existing.pop(name, None)
                    else:
                        existing[name] = old
                indexes.put(existing)
                raise
        modified += 1
    matched = len(matches)
    return {"connectionId": self.database.client._id, "err": None, "n": matched,
            "nModified": modified, "ok": 1, "upserted": None,
            "updatedExisting": bool(matched)}


def _bulk_write(self: Any, requests: Any, ordered: bool = True,
                bypass_document_validation: bool = False, session: Any = None) -> Any:
    """mongomock's `bulk_write` of an ordered list of plain `UpdateOne`s (no upsert,
    collation, array filters, hint or sort: an engine's batch of outcomes), without its
    bulk builder: each update is checked first and then applied in order, as mongomock
    does, stopping at the first write error, with the same result and error. mongomock's
    builder made a closure and an operation object per update and aggregated each
    result key by key: a seventh of an outcome's write. Anything else is mongomock's."""
    requests = list(requests)
    if (_indexes(self._store) is None or not ordered or bypass_document_validation
            or session or not requests or not all(map(_plain_update_one, requests))):
        return _original_bulk_write(self, requests, ordered, bypass_document_validation,
                                    session)
    for request in requests:
        _validate_update(request._doc)
    result: dict[str, Any] = {
        "nModified": 0, "nUpserted": 0, "nMatched": 0, "writeErrors": [], "upserted": [],
        "writeConcernErrors": [], "nRemoved": 0, "nInserted": 0}
    for index, request in enumerate(requests):
        try:
            answer = self._update(spec=request._filter, document=request._doc, hint=None)
        except WriteError as error:
            result["writeErrors"].append(
                {"index": index, "code": error.code, "errmsg": str(error)})
            raise BulkWriteError(result) from None
        result["nMatched"] += answer["n"]
        result["nModified"] += answer["nModified"]
    return _BulkWriteResult(result, True)


def _plain_update_one(request: Any) -> bool:
    return (type(request) is UpdateOne and not request._upsert
            and request._collation is None and request._array_filters is None
            and request._hint is None and getattr(request, "_sort", None) is None)


def _setitem(self: Any, key: Any, value: Any) -> None:
    _original_setitem(self, key, value)
    indexes = _indexes(self)
    if indexes is not None:
        indexes.put(value)


def _delitem(self: Any, key: Any) -> None:
    _original_delitem(self, key)
    indexes = _indexes(self)
    if indexes is not None:
        indexes.drop(key)


def _create_index(self: Any, index_name: Any, index_dict: Any) -> None:
    _original_create_index(self, index_name, index_dict)
    self.__dict__.pop(_UNIQUE_ATTR, None)


def _drop_index(self: Any, index_name: Any) -> None:
    self.__dict__.pop(_UNIQUE_ATTR, None)
    _original_drop_index(self, index_name)


def _drop(self: Any) -> None:
    _original_drop(self)
    indexes = _indexes(self)
    if indexes is not None:
        indexes.clear()


def _add_update(self: Any, selector: Any, doc: Any, multi: bool = False,
                upsert: bool = False, collation: Any = None, array_filters: Any = None,
                hint: Any = None, sort: Any = None) -> None:
    """pymongo 4.11 hands `UpdateOne`/`ReplaceOne` a `sort` to mongomock's bulk, which
    does not know it: `bulk_write` of either failed with a TypeError. Without a sort,
    the operation is mongomock's; with one, it says it cannot."""
    if sort is not None:
        raise NotImplementedError("mongomock: bulk updates with a sort")
    _original_add_update(self, selector, doc, multi, upsert, collation, array_filters, hint)


def _add_replace(self: Any, selector: Any, doc: Any, upsert: bool, collation: Any = None,
                 hint: Any = None, sort: Any = None) -> None:
    if sort is not None:
        raise NotImplementedError("mongomock: bulk replacements with a sort")
    _original_add_replace(self, selector, doc, upsert, collation, hint)


# Installed when this module is imported (before any collection is made), so that
# whatever wraps mongomock afterwards (a test's instrumentation) wraps these.
_Collection._iter_documents = _iter_documents
_Cursor._compute_results = _compute_results
_Collection.count_documents = _count_documents
_Collection._apply_update_document = _apply_update_document
_Collection._apply_update_pipeline = _apply_update_pipeline
_Collection._update = _update
_Collection.bulk_write = _bulk_write
_Bulk.add_update = _add_update
_Bulk.add_replace = _add_replace
_Store.__setitem__ = _setitem
_Store.__delitem__ = _delitem
_Store.drop = _drop
_Store.create_index = _create_index
_Store.drop_index = _drop_index


def index_collection(collection: Any, specs: Sequence[tuple[str, ...]] = (),
                     ordered: Sequence[tuple[tuple[str, ...], str]] = (),
                     lead: tuple[str, tuple[tuple[str, ...], str]] | None = None,
                     only: Mapping[tuple[tuple[str, ...], str], tuple[str, Iterable[Any]]]
                     | None = None) -> None:
    """Give a mongomock collection hash indexes on `specs` (tuples of field names),
    and on `ordered` ((fields, date field) pairs) the same ordered by the date, pages
    sorted by `lead` then the date read in that order (see `HashIndexes`); `_id`
    lookups are fast with no spec at all. Documents it holds already are indexed now."""
    store = collection._store
    if _indexes(store) is not None:
        return
    indexes = HashIndexes(specs, ordered, lead, only)
    for document in list(store._documents.values()):
        indexes.put(document)
    setattr(store, _ATTR, indexes)
