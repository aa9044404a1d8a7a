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
its documents ordered by one more field (a date: `runAt`, `finishedAt`), so that a
range on it (`runAt <= now`) reads only the documents in range. `count_documents` of a
filter that is nothing but an indexed equality is answered from the index's size.

A page (`find(...).sort(...).limit(k)`, the claim of a batch of runs) is computed the
other way round: the candidates are sorted first, then filtered only until the page is
full, and only the page's documents are copied. mongomock filters and copies every
match before it sorts and cuts the page, so a claim of 100 runs in a burst of 10,000
cost 10,000 filters and copies. Stable sorting and filtering commute, so the page is
the same documents in the same order.

The indexes stay current through the few places where mongomock changes data: its
store's `__setitem__` (inserts, rollbacks) and `__delitem__` (deletes), and the two
methods that update a stored document in place. These are patched once, at class
level, and do nothing more for collections without indexes. mongomock is pinned
below 5 (`pyproject.toml`); tests/test_embedded.py checks the answers against plain
mongomock.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import mongomock.collection
import mongomock.store
from mongomock import helpers
from mongomock.filtering import filter_applies, resolve_sort_key
from sortedcontainers import SortedList

_ATTR = "_mwapjobs_index"
_MAX_COMBINATIONS = 64  # values of an `$in` (times another's) worth a lookup


class _Unhashable(Exception):
    pass


def _key(value: Any) -> Any:
    """A value as an index key; arrays and documents are not indexed (see `_wild`)."""
    if isinstance(value, list | dict):
        raise _Unhashable
    try:
        hash(value)
    except TypeError:
        raise _Unhashable from None
    return value


def _field(doc: dict[str, Any], name: str) -> Any:
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
                 ordered: Sequence[tuple[tuple[str, ...], str]] = ()) -> None:
        self.specs = sorted({*specs, *(spec for spec, _ in ordered)}, key=len, reverse=True)
        self._entries: dict[tuple[str, ...], dict[Any, set[Any]]] = {
            s: {} for s in self.specs}
        self.ordered = list(ordered)
        self._sorted: dict[tuple[tuple[str, ...], str], dict[Any, SortedList[Any]]] = {
            o: {} for o in self.ordered}
        # _id -> its key per spec (None: not indexed, every field null or missing) and its
        # entry per ordered index (None: no date), tuples aligned with `specs`/`ordered`:
        # a run of 100,000 pays for each of these, so they are kept small.
        self._keys: dict[Any, tuple[Any, ...]] = {}
        self._dates: dict[Any, tuple[Any, ...]] = {}
        self._spec_at = {spec: i for i, spec in enumerate(self.specs)}
        self._wild: set[Any] = set()  # documents with an array or document in a field
        self._order: dict[Any, int] = {}  # _id -> insertion rank, for mongomock's order
        self._next = itertools.count()

    # -- upkeep --------------------------------------------------------------

    def put(self, doc: dict[str, Any]) -> None:
        _id = doc.get("_id")
        self.drop(_id, keep_order=True)
        self._order.setdefault(_id, next(self._next))
        try:
            keys = tuple(_indexed(tuple(_key(_field(doc, f)) for f in spec))
                         for spec in self.specs)
        except _Unhashable:
            self._wild.add(_id)
            return
        for spec, key in zip(self.specs, keys, strict=True):
            if key is not None:
                self._entries[spec].setdefault(key, set()).add(_id)
        self._keys[_id] = keys
        rank = self._order[_id]
        dates: list[Any] = []
        for spec, field in self.ordered:
            when = _field(doc, field)
            key = keys[self._spec_at[spec]]
            entry = None
            if key is not None and isinstance(when, datetime):
                entry = (_utc_naive(when), rank, _id)
                self._sorted[(spec, field)].setdefault(key, SortedList()).add(entry)
            dates.append(entry)
        if any(entry is not None for entry in dates):
            self._dates[_id] = tuple(dates)

    def drop(self, _id: Any, *, keep_order: bool = False) -> None:
        self._wild.discard(_id)
        keys = self._keys.pop(_id, None)
        if keys is not None:
            for (spec, field), entry in zip(self.ordered, self._dates.pop(_id, ()),
                                            strict=False):
                group = self._sorted[(spec, field)].get(keys[self._spec_at[spec]])
                if group is not None and entry is not None:
                    group.discard(entry)
            for spec, key in zip(self.specs, keys, strict=True):
                ids = self._entries[spec].get(key) if key is not None else None
                if ids is not None:
                    ids.discard(_id)
                    if not ids:
                        del self._entries[spec][key]
        if not keep_order:
            self._order.pop(_id, None)

    def clear(self) -> None:
        for entries in self._entries.values():
            entries.clear()
        for groups in self._sorted.values():
            groups.clear()
        self._dates.clear()
        self._keys.clear()
        self._wild.clear()
        self._order.clear()

    # -- lookups ---------------------------------------------------------------

    def candidates(self, query: Any) -> set[Any] | None:
        """A superset of the `_id`s of the documents `query` can match, or None if no
        index narrows it down."""
        if not isinstance(query, dict):
            return None
        ids = _values(query.get("_id")) if "_id" in query else None
        if ids is not None:
            return set(ids)
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
            union: set[Any] = set()
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

    def _lookup(self, spec: tuple[str, ...], query: dict[str, Any]) -> set[Any] | None:
        combos = _combos(spec, query)
        if combos is None:
            return None
        entries = self._entries[spec]
        found: set[Any] = set()
        for combo in combos:
            found |= entries.get(combo, set())
        return found

    def _range(self, spec: tuple[str, ...], field: str,
               query: dict[str, Any]) -> set[Any] | None:
        bounds = _date_bounds(query.get(field))
        if bounds is None:
            return None
        combos = _combos(spec, query)
        if combos is None:
            return None
        low, high = bounds
        found: set[Any] = set()
        groups = self._sorted[(spec, field)]
        for combo in combos:
            group = groups.get(combo)
            if group:
                start = 0 if low is None else group.bisect_left((low,))
                stop = len(group) if high is None else group.bisect_right((high, _TOP))
                found.update(entry[2] for entry in group.islice(start, stop))
        return found

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

    def in_order(self, ids: Iterable[Any]) -> list[Any]:
        order = self._order
        return sorted((i for i in ids if i in order), key=order.__getitem__)


_TOP = float("inf")  # sorts after every insertion rank at the same date
_applies: Callable[[Any, Any], bool] = filter_applies
_sort_key: Callable[[str, Any], Any] = resolve_sort_key
_aware: Callable[[Any], Any] = helpers.make_datetime_timezone_aware_in_document


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
    missing, as most runs' `key`, `slot`, `claimToken`, `writeToken` and `jobId` are."""
    return None if all(part is None for part in key) else key


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
_original_iter = _Collection._iter_documents
_original_compute = _Cursor._compute_results
_original_count = _Collection.count_documents
_original_update_doc = _Collection._apply_update_document
_original_update_pipeline = _Collection._apply_update_pipeline
_original_setitem = _Store.__setitem__
_original_delitem = _Store.__delitem__
_original_drop = _Store.drop


def _iter_documents(self: Any, filter: Any) -> Iterator[dict[str, Any]]:
    indexes = _indexes(self._store)
    ids = indexes.candidates(filter) if indexes is not None else None
    if indexes is None or ids is None:
        yield from _original_iter(self, filter)
        return
    if not ids:
        _applies(filter, {})  # still refuse a malformed filter, as mongomock does
    documents = self._store._documents
    for _id in indexes.in_order(ids):
        document = documents.get(_id)
        if document is not None and _applies(filter, document):
            yield document


def _by(key: str, document: dict[str, Any]) -> Any:
    return _sort_key(key, document)


_PLAIN = ({int}, {float}, {int, float}, {str}, {datetime})
_MISSING = object()


def _plain_values(dataset: list[dict[str, Any]], key: str) -> list[Any] | None:
    """The values of a top-level field, if every document has one and all are of one
    simple type (numbers, strings or dates), whose Python order is BSON's."""
    if "." in key:
        return None
    values = [d.get(key, _MISSING) for d in dataset]
    return values if {type(v) for v in values} in _PLAIN else None


def _page(collection: Any, indexes: HashIndexes, spec: Any, sort: Any, fields: Any,
          skip: int, limit: int) -> list[dict[str, Any]] | None:
    """Documents `skip` to `skip + limit` of `find(spec).sort(sort)`, as mongomock's
    `_get_dataset` would give them, without filtering or copying the rest; None when
    the indexes do not narrow the query down (mongomock's own way then)."""
    ids = indexes.candidates(spec)
    if ids is None:
        return None
    documents = collection._store._documents
    dataset = [documents[i] for i in indexes.in_order(ids) if i in documents]
    if not dataset:
        _applies(spec, {})  # still refuse a malformed filter, as mongomock does
    for key, direction in reversed(list(sort.items() if isinstance(sort, dict) else sort)):
        if key == "$natural":
            if direction < 0:
                dataset.reverse()
            continue
        if key.startswith("$"):
            return None  # mongomock refuses it: let it say so
        plain = _plain_values(dataset, key)
        if plain is not None:  # one simple type: its own order is BSON's, and cheaper
            try:
                order = sorted(range(len(dataset)), key=plain.__getitem__,
                               reverse=direction < 0)
                dataset = [dataset[i] for i in order]
                continue
            except TypeError:  # naive and aware datetimes, say: BSON's comparison then
                pass
        dataset.sort(key=functools.partial(_by, key), reverse=direction < 0)
    wanted = skip + limit
    page: list[dict[str, Any]] = []
    for document in dataset:
        if _applies(spec, document):
            page.append(document)
            if len(page) >= wanted:
                break
    return [collection._copy_only_fields(d, fields, dict) for d in page[skip:]]


def _compute_results(self: Any, with_limit_and_skip: bool = False) -> list[dict[str, Any]]:
    indexes = _indexes(self.collection._store)
    if not with_limit_and_skip or not self._limit or not self._sort or indexes is None:
        return list(_original_compute(self, with_limit_and_skip))
    cached = getattr(self, "_mwapjobs_page", None)
    if cached is not None and cached[0] is self._factory:  # __next__ asks once per document
        return cached[1]  # type: ignore[no-any-return]
    page = _page(self.collection, indexes, self._spec, self._sort, self._projection,
                 self._skip, abs(self._limit))
    if page is None:
        return list(_original_compute(self, with_limit_and_skip))
    if self.collection.codec_options.tz_aware:
        page = [_aware(d) for d in page]
    self._mwapjobs_page = (self._factory, page)
    return page


def _count_documents(self: Any, filter: Any, **kwargs: Any) -> int:
    indexes = _indexes(self._store)
    if indexes is not None and not kwargs:
        count = indexes.exact_count(filter)
        if count is not None:
            return count
    result: int = _original_count(self, filter, **kwargs)
    return result


def _apply_update_document(self: Any, existing: dict[str, Any], *args: Any) -> None:
    _original_update_doc(self, existing, *args)
    indexes = _indexes(self._store)
    if indexes is not None and "_id" in existing and existing["_id"] in self._store._documents:
        indexes.put(existing)


def _apply_update_pipeline(self: Any, existing: dict[str, Any], *args: Any) -> None:
    _original_update_pipeline(self, existing, *args)
    indexes = _indexes(self._store)
    if indexes is not None and existing.get("_id") in self._store._documents:
        indexes.put(existing)


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


def _drop(self: Any) -> None:
    _original_drop(self)
    indexes = _indexes(self)
    if indexes is not None:
        indexes.clear()


# Installed when this module is imported (before any collection is made), so that
# whatever wraps mongomock afterwards (a test's instrumentation) wraps these.
_Collection._iter_documents = _iter_documents
_Cursor._compute_results = _compute_results
_Collection.count_documents = _count_documents
_Collection._apply_update_document = _apply_update_document
_Collection._apply_update_pipeline = _apply_update_pipeline
_Store.__setitem__ = _setitem
_Store.__delitem__ = _delitem
_Store.drop = _drop


def index_collection(collection: Any, specs: Sequence[tuple[str, ...]] = (),
                     ordered: Sequence[tuple[tuple[str, ...], str]] = ()) -> None:
    """Give a mongomock collection hash indexes on `specs` (tuples of field names),
    and on `ordered` ((fields, date field) pairs) the same ordered by the date; `_id`
    lookups are fast with no spec at all. Documents it holds already are indexed now."""
    store = collection._store
    if _indexes(store) is not None:
        return
    indexes = HashIndexes(specs, ordered)
    for document in list(store._documents.values()):
        indexes.put(document)
    setattr(store, _ATTR, indexes)
