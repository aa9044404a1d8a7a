"""Per-document values in one update: the form that works on MongoDB and on mongomock.

Writing different values into many documents in one round trip is what `bulk_write`
is for, but mongomock's `bulk_write` with `UpdateOne` is broken with pymongo >= 4.11,
and mongomock has no `$indexOfArray` either. A pipeline update whose first stage hands
each document its own value does work on both: `by_id` builds a binary decision tree on
`_id` (O(log n) comparisons per document), and the filter limits the update to the
documents of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def by_id(values: Sequence[tuple[Any, Any]]) -> Any:
    """An aggregation expression giving each `_id` in `values` (sorted by id) its value
    (as a literal, never interpreted), and null to any other document."""
    if not values:
        return None
    if len(values) == 1:
        key, value = values[0]
        return {"$cond": [{"$eq": ["$_id", key]}, {"$literal": value}, None]}
    middle = len(values) // 2
    return {"$cond": [{"$lt": ["$_id", values[middle][0]]},
                      by_id(values[:middle]), by_id(values[middle:])]}
