"""Per-document values in one update: a pipeline form that works on MongoDB and on
mongomock, for writes that compute from the stored document (analytics' sums, the file
index's quotas and paths).

A pipeline update whose first stage hands each document its own value: `by_id` builds a
binary decision tree on `_id` (O(log n) comparisons per document), and the filter limits
the update to the documents of the batch; mongomock has no `$indexOfArray`. Writes of
plain values (a run's outcome) are one `UpdateOne` per document in one `bulk_write`
instead, which mongomock's bulk accepts since `embedded.py` mends it for pymongo 4.11.
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
