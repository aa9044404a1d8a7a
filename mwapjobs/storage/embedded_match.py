"""The embedded store's filter matcher: mongomock's answers for the simple filters the
engine sends on every run, at a tenth of the cost.

mongomock's `filter_applies` interprets a filter anew for every document (a claim's
filter took about 50 µs per candidate, twice per run in a burst). `matcher` compiles
a filter once into closures for the shapes that matter (equality, `$ne`, `$in`,
`$nin`, comparisons, `$exists` on plain values, `$and`/`$or`/`$nor` of those) and
hands every other filter, and every document whose value is an array or a sub-document
(where MongoDB's matching is subtle), to mongomock itself. So the answers are
mongomock's by construction: tests/test_embedded_match.py checks them against
`filter_applies` over a table of filters and documents.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from datetime import datetime
from typing import Any

from bson import ObjectId
from mongomock import filtering
from sentinels import NOTHING  # type: ignore[import-untyped]  # mongomock's "no such field"

Test = Callable[[dict[str, Any]], bool]

_NOTHING: Any = NOTHING
_applies: Callable[[Any, Any], bool] = filtering.filter_applies
_bson_compare: Callable[..., bool] = filtering.bson_compare
_PLAIN = (type(None), bool, int, float, str, ObjectId, datetime)  # operands compiled
_EXACT = frozenset({str, int, bool, ObjectId})  # hashable, and equal only to their like
_SAME_ORDER = frozenset({int, float, str, ObjectId, datetime})  # Python's order is BSON's
_COMPARE = {"$lt": operator.lt, "$lte": operator.le, "$gt": operator.gt, "$gte": operator.ge}
_LOGICAL = frozenset({"$and", "$or", "$nor"})


class _Defer(Exception):
    """This document's value is one mongomock must judge (an array, a sub-document)."""


def matcher(query: Any) -> Test:
    """`filter_applies(query, document)` as a function of the document, fast when the
    filter compiles. mongomock validates filters as it meets them; a filter that does
    not compile goes to it whole, so a malformed one still fails as it did."""
    key = _flat_key(query)
    test = _compiled.get(key) if key is not None else None
    if test is None:
        test = compile_filter(query)
        if key is not None and test is not None:
            if len(_compiled) >= _KEEP:
                _compiled.clear()
            _compiled[key] = test
    if test is None:
        return functools.partial(_applies, query)

    def match(document: dict[str, Any]) -> bool:
        try:
            return test(document)
        except _Defer:
            return _applies(query, document)

    return match


# Compiled tests of flat filters (every field equal to a plain value), by content: an
# outcome's filter (its run's state and owner, the `_id` taken apart) is the same for
# every run of a burst, and compiling it each time was a tenth of the write.
_KEEP = 256
_compiled: dict[tuple[Any, ...], Test] = {}


def _flat_key(query: Any) -> tuple[Any, ...] | None:
    if type(query) is not dict:
        return None
    key = []
    for name, value in query.items():
        if type(value) not in _EXACT:
            return None
        key.append((name, type(value), value))
    return tuple(key)


def compile_filter(query: Any) -> Test | None:
    """A test equivalent to mongomock's for documents whose filtered values are plain
    (it raises `_Defer` on others), or None if the filter has another shape."""
    if not isinstance(query, dict):
        return None
    tests: list[Test] = []
    for key, condition in query.items():
        if key == "$comment":
            continue
        if key in _LOGICAL:
            if not isinstance(condition, list) or not condition:
                return None  # mongomock says why
            branches = [compile_filter(branch) for branch in condition]
            if any(branch is None for branch in branches):
                return None
            tests.append(_logical(key, branches))  # type: ignore[arg-type]
            continue
        if not isinstance(key, str) or not key or key.startswith("$"):
            return None
        check = _condition(condition)
        if check is None:
            return None
        tests.append(_on_field(key, check))
    if len(tests) == 1:
        return tests[0]

    if len(tests) == 2:  # the usual outcome or claim filter: no loop at all
        first, second = tests
        return lambda document: first(document) and second(document)

    def every(document: dict[str, Any]) -> bool:
        for test in tests:  # noqa: SIM110  (a loop: no generator per document)
            if not test(document):
                return False
        return True

    return every


def _logical(op: str, branches: list[Test]) -> Test:
    def some(document: dict[str, Any]) -> bool:
        for branch in branches:  # noqa: SIM110  (a loop: no generator per document)
            if branch(document):
                return True
        return False

    if op == "$or":
        return some
    if op == "$and":
        return lambda document: all(branch(document) for branch in branches)
    return lambda document: not some(document)


def _on_field(key: str, check: Callable[[Any], bool]) -> Test:
    """`check` on the field's one value. mongomock matches an array by its elements and
    a path through a non-document by "no candidates": those documents defer."""
    if "." not in key:
        def top(document: dict[str, Any]) -> bool:
            value = document.get(key, _NOTHING)
            if isinstance(value, list | tuple | dict):
                raise _Defer
            return check(value)

        return top
    parts = key.split(".")

    def dotted(document: dict[str, Any]) -> bool:
        value: Any = document
        for part in parts:
            if not isinstance(value, dict):
                raise _Defer
            value = value.get(part, _NOTHING)
            if value is _NOTHING:
                break
        if isinstance(value, list | tuple | dict):
            raise _Defer
        return check(value)

    return dotted


def _plain(value: Any) -> bool:
    return isinstance(value, _PLAIN)


def _condition(condition: Any) -> Callable[[Any], bool] | None:
    """The test of one field's condition, on a plain value or `_NOTHING`."""
    if not isinstance(condition, dict):
        if not _plain(condition):
            return None  # a regex, an array, ...
        return lambda value: value == condition or (condition is None and value is _NOTHING)
    if not condition or not all(isinstance(k, str) and k.startswith("$") for k in condition):
        return None  # {} or a whole sub-document: equality of documents
    checks: list[Callable[[Any], bool]] = []
    for op, operand in condition.items():
        check = _operator(op, operand)
        if check is None:
            return None
        checks.append(check)
    if len(checks) == 1:
        return checks[0]
    return lambda value: all(check(value) for check in checks)


def _operator(op: str, operand: Any) -> Callable[[Any], bool] | None:
    if op == "$exists":
        wanted = bool(operand)
        return lambda value: (value is not _NOTHING) == wanted
    if op in ("$eq", "$ne"):
        if not _plain(operand):
            return None

        def equal(value: Any) -> bool:
            return (value is _NOTHING and operand is None) or value == operand

        return equal if op == "$eq" else lambda value: not equal(value)
    if op in ("$in", "$nin"):
        if not isinstance(operand, list | tuple) or not all(map(_plain, operand)):
            return None
        allowed = frozenset(operand)
        with_none = None in allowed

        def within(value: Any) -> bool:
            if value is _NOTHING:
                return with_none
            try:
                return value in allowed
            except TypeError:  # an unhashable value: mongomock compares it one by one
                raise _Defer from None

        return within if op == "$in" else lambda value: not within(value)
    compare = _COMPARE.get(op)
    if compare is None or not _plain(operand):
        return None
    kind = type(operand)

    same_order = kind in _SAME_ORDER

    def ordered(value: Any) -> bool:
        if value is _NOTHING:
            return False
        try:
            if same_order and type(value) is kind:
                return bool(compare(value, operand))
            return _bson_compare(compare, value, operand, can_compare_types=False)
        except Exception:  # naive against aware dates, an unknown type: mongomock's call
            raise _Defer from None

    return ordered
