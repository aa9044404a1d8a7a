"""Upkeep's decisions, pure (no I/O): tested as tables in tests/test_maintenance_decide.py.

- `effective_cutoff`: which of a retention's age and count limits reaches further;
- `archive_day`: the day (UTC) a document is filed under in the archive;
- `rotation`: which archive files go (more than `keep_files`, or older than `keep_days`);
- `index_findings`: expected indexes against the ones a collection has (a compound index
  whose keys start with the expected ones serves it too);
- `orphans`: references to documents that are gone, compared as strings.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from ...storage.maintenance import Cutoff


def effective_cutoff(age_before: datetime | None, count: Cutoff | None) -> Cutoff | None:
    """The cutoff that removes more: documents older than `age_before`, or those beyond
    the count boundary (`count`, inclusive of its document). None: nothing goes."""
    if age_before is None:
        return count
    if count is None or count.before < age_before:
        return Cutoff(age_before)
    return count


def archive_day(value: Any, fallback: date) -> date:
    """The UTC day of a document's date (a datetime, or the ISO text the backend's audit
    lines carry); `fallback` when it has none that reads."""
    if isinstance(value, datetime):
        stamp = value if value.tzinfo else value.replace(tzinfo=UTC)
        return stamp.astimezone(UTC).date()
    if isinstance(value, str) and len(value) >= 10:
        try:
            return date.fromisoformat(value[:10])
        except ValueError:
            return fallback
    return fallback


def rotation(files: Iterable[tuple[str, date]], today: date, keep_files: int,
             keep_days: float) -> list[str]:
    """The archive files to delete: beyond the newest `keep_files`, and any whose day is
    more than `keep_days` before `today`. Names, oldest first."""
    ordered = sorted(files, key=lambda f: (f[1], f[0]), reverse=True)
    oldest_kept = today - timedelta(days=keep_days)
    gone = [name for n, (name, day) in enumerate(ordered)
            if n >= keep_files or day < oldest_kept]
    return list(reversed(gone))


@dataclass(frozen=True)
class ExpectedIndex:
    owner: str  # "backend", "mwapjobs" or "recommended"
    collection: str
    keys: tuple[tuple[str, int], ...]
    unique: bool = False
    name: str | None = None  # ours are known by name; the backend's by their keys


def _covers(present: Sequence[Sequence[Any]], expected: tuple[tuple[str, int], ...]) -> bool:
    keys = [(str(k), int(v) if isinstance(v, int | float) else v) for k, v in present]
    return keys[:len(expected)] == list(expected)


def index_findings(expected: Sequence[ExpectedIndex],
                   present: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """One finding per expected index: `{owner, collection, keys, unique, name, present,
    by}` (`by`: the index that serves it). A unique index must be matched by a unique
    one; a collection that does not exist has none."""
    out: list[dict[str, Any]] = []
    for want in expected:
        have = present.get(want.collection) or []
        match = None
        for index in have:
            if want.name is not None:
                if index.get("name") == want.name:
                    match = index
                    break
                continue
            if _covers(index.get("key") or [], want.keys) and (
                    not want.unique or (index.get("unique") and
                                        len(index.get("key") or []) == len(want.keys))):
                match = index
                break
        out.append({"owner": want.owner, "collection": want.collection,
                    "keys": {k: v for k, v in want.keys}, "unique": want.unique,
                    "name": want.name, "present": match is not None,
                    "by": None if match is None else match.get("name")})
    return out


def orphans(referenced: Mapping[str, int], existing: set[str]) -> tuple[int, list[str]]:
    """(documents that reference a missing id, the missing ids, sorted)."""
    missing = sorted(value for value in referenced if value not in existing)
    return sum(referenced[value] for value in missing), missing
