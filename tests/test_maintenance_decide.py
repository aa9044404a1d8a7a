"""Upkeep's pure decisions (mwapjobs/jobs/maintenance/decide.py), as tables."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from mwapjobs.jobs.maintenance.decide import (
    ExpectedIndex,
    archive_day,
    effective_cutoff,
    index_findings,
    orphans,
    rotation,
)
from mwapjobs.storage.maintenance import Cutoff

T = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(("age", "count", "expected"), [
    (None, None, None),
    (T, None, Cutoff(T)),
    (None, Cutoff(T, "id9"), Cutoff(T, "id9")),
    # the count boundary is older: the age limit removes more
    (T, Cutoff(T - timedelta(hours=1), "id1"), Cutoff(T)),
    # the count boundary is newer (a busy queue): it removes more
    (T, Cutoff(T + timedelta(hours=1), "id2"), Cutoff(T + timedelta(hours=1), "id2")),
    # the same instant: the count boundary includes its own document, so it reaches further
    (T, Cutoff(T, "id3"), Cutoff(T, "id3")),
])
def test_the_cutoff_that_removes_more_wins(age: datetime | None, count: Cutoff | None,
                                           expected: Cutoff | None) -> None:
    assert effective_cutoff(age, count) == expected


@pytest.mark.parametrize(("value", "expected"), [
    (datetime(2026, 3, 4, 23, 59, tzinfo=UTC), date(2026, 3, 4)),
    (datetime(2026, 3, 4, 23, 30, tzinfo=UTC).astimezone(
        ZoneInfo("Europe/Paris")), date(2026, 3, 4)),  # UTC day
    (datetime(2026, 3, 4, 1, 0), date(2026, 3, 4)),  # naive: read as UTC
    ("2026-02-01T10:00:00.000Z", date(2026, 2, 1)),  # the backend's audit text
    ("not a date", date(2000, 1, 1)),
    (None, date(2000, 1, 1)),
    (12345, date(2000, 1, 1)),
])
def test_archive_day(value: Any, expected: date) -> None:
    assert archive_day(value, date(2000, 1, 1)) == expected


def _files(*days: int) -> list[tuple[str, date]]:
    return [(f"f-{d}", date(2026, 1, d)) for d in days]


@pytest.mark.parametrize(("days", "keep_files", "keep_days", "gone"), [
    ((1, 2, 3), 10, 100, []),
    ((1, 2, 3), 2, 100, ["f-1"]),  # by count: the oldest goes
    ((1, 2, 3, 4), 2, 100, ["f-1", "f-2"]),
    ((1, 20, 30), 10, 15, ["f-1"]),  # by age: more than 15 days before the 31st
    ((1, 20, 30), 1, 15, ["f-1", "f-20"]),  # both
    ((), 1, 1, []),
])
def test_rotation(days: tuple[int, ...], keep_files: int, keep_days: float,
                  gone: list[str]) -> None:
    assert rotation(_files(*days), date(2026, 1, 31), keep_files, keep_days) == gone


OWNER_UNIQUE = ExpectedIndex("backend", "tenants", (("ownerId", 1),), unique=True)
BY_TENANT = ExpectedIndex("backend", "projects", (("tenantId", 1),))
OURS = ExpectedIndex("mwapjobs", "runs", (("key", 1),), name="mwapjobs_dedupe")


@pytest.mark.parametrize(("want", "indexes", "present", "by"), [
    (BY_TENANT, [], False, None),
    (BY_TENANT, [{"name": "t", "key": [["tenantId", 1]]}], True, "t"),
    # a compound index that starts with the keys serves the query too
    (BY_TENANT, [{"name": "tc", "key": [["tenantId", 1], ["createdAt", -1]]}], True, "tc"),
    (BY_TENANT, [{"name": "ct", "key": [["createdAt", -1], ["tenantId", 1]]}], False, None),
    (BY_TENANT, [{"name": "d", "key": [["tenantId", -1]]}], False, None),
    # unique: only a unique index on exactly those keys guarantees it
    (OWNER_UNIQUE, [{"name": "o", "key": [["ownerId", 1]]}], False, None),
    (OWNER_UNIQUE, [{"name": "o", "key": [["ownerId", 1]], "unique": True}], True, "o"),
    (OWNER_UNIQUE, [{"name": "o2", "key": [["ownerId", 1], ["x", 1]], "unique": True}],
     False, None),
    # ours are known by name
    (OURS, [{"name": "other", "key": [["key", 1]], "unique": True}], False, None),
    (OURS, [{"name": "mwapjobs_dedupe", "key": [["key", 1]], "unique": True}], True,
     "mwapjobs_dedupe"),
])
def test_index_findings(want: ExpectedIndex, indexes: list[dict[str, Any]], present: bool,
                        by: str | None) -> None:
    [finding] = index_findings([want], {want.collection: indexes})
    assert (finding["present"], finding["by"]) == (present, by)
    assert finding["owner"] == want.owner and finding["collection"] == want.collection


@pytest.mark.parametrize(("referenced", "existing", "expected"), [
    ({}, set(), (0, [])),
    ({"a": 3, "b": 1}, {"a", "b"}, (0, [])),
    ({"a": 3, "b": 1, "c": 2}, {"a"}, (3, ["b", "c"])),
])
def test_orphans(referenced: dict[str, int], existing: set[str],
                 expected: tuple[int, list[str]]) -> None:
    assert orphans(referenced, existing) == expected
