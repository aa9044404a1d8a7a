"""Archive files: compressed NDJSON, one file per collection and day, complete or absent.

Layout: `<archive_dir>/<folder>/<folder>-<YYYY-MM-DD>.ndjson.gz`, the day being the UTC
day of each document's own date (when a run finished, a notification was made...), so
restoring a day means reading one file: `zcat FILE | jq .` (each line is one document in
relaxed Extended JSON, which `mongoimport` reads back).

A write never leaves a half file under the final name: the day's existing file (if any)
is copied to a temporary file in the same folder, the new lines are appended to it as
one more gzip member (a gzip file may hold several; `zcat` and Python's `gzip` read them
as one stream), the temporary file is flushed and fsynced, renamed over the final name,
and the folder fsynced. Only then are the documents deleted from MongoDB, so a crash
loses nothing; it may at worst archive a document twice (its `_id` tells).

Every method here is blocking file work: callers run it with `asyncio.to_thread`.
Files are created mode 0600 and folders 0700 (history can name tenants).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable
from datetime import date
from pathlib import Path
from typing import Any

from ...storage.maintenance import encode_lines
from .decide import archive_day, rotation

_NAME = re.compile(r"^(?P<folder>.+)-(?P<day>\d{4}-\d{2}-\d{2})\.ndjson\.gz$")
STALE_TEMP_SECONDS = 3600.0  # a temporary file this old is a crashed write's


class Archive:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def check(self) -> str | None:
        """Why files cannot be written there, or None (the directory is made if needed)."""
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            probe = self.root / f".probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            return f"{type(exc).__name__}: {exc}"[:300]
        return None

    def path(self, folder: str, day: date) -> Path:
        return self.root / folder / f"{folder}-{day.isoformat()}.ndjson.gz"

    def write(self, folder: str, docs: Iterable[dict[str, Any]], date_field: str,
              today: date) -> dict[str, int]:
        """Append `docs` to the files of their days (see the module's docstring).
        Returns {file name: documents added}. Encoding and compression happen here, in
        the caller's thread, never on the event loop."""
        by_day: dict[date, list[dict[str, Any]]] = {}
        for doc in docs:
            by_day.setdefault(archive_day(_get(doc, date_field), today), []).append(doc)
        target = self.root / folder
        target.mkdir(mode=0o700, parents=True, exist_ok=True)
        written: dict[str, int] = {}
        for day, group in sorted(by_day.items()):
            final = self.path(folder, day)
            self._append(final, encode_lines(group))
            written[final.name] = len(group)
        _fsync_dir(target)
        return written

    def _append(self, final: Path, data: bytes) -> None:
        temp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
        try:
            if final.exists():
                shutil.copyfile(final, temp)
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "ab") as raw:
                with gzip.GzipFile(fileobj=raw, mode="ab", mtime=0) as member:
                    member.write(data)
                raw.flush()
                os.fsync(raw.fileno())
            os.chmod(temp, 0o600)
            os.replace(temp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise

    def files(self, folder: str) -> list[tuple[str, date]]:
        found: list[tuple[str, date]] = []
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.root / folder):
                match = _NAME.match(entry.name)
                if match and match["folder"] == folder:
                    with contextlib.suppress(ValueError):
                        found.append((entry.name, date.fromisoformat(match["day"])))
        return found

    def rotate(self, folder: str, today: date, keep_files: int,
               keep_days: float) -> list[str]:
        """Delete the files beyond the newest `keep_files` or older than `keep_days`, and
        temporary files a crashed write left; returns the archive files deleted."""
        target = self.root / folder
        gone = rotation(self.files(folder), today, keep_files, keep_days)
        for name in gone:
            with contextlib.suppress(FileNotFoundError):
                (target / name).unlink()
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(target):
                if entry.name.endswith(".tmp") and entry.name.startswith("."):
                    with contextlib.suppress(OSError):
                        if time.time() - entry.stat().st_mtime > STALE_TEMP_SECONDS:
                            os.unlink(entry.path)
        if gone:
            _fsync_dir(target)
        return gone

    def summary(self, folders: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Per folder: how many files, their bytes, the oldest and newest day."""
        out: dict[str, dict[str, Any]] = {}
        for folder in folders:
            files = self.files(folder)
            size = 0
            for name, _ in files:
                with contextlib.suppress(OSError):
                    size += (self.root / folder / name).stat().st_size
            days = sorted(day for _, day in files)
            out[folder] = {"files": len(files), "bytes": size,
                           "oldest": days[0].isoformat() if days else None,
                           "newest": days[-1].isoformat() if days else None}
        return out


def _get(doc: dict[str, Any], dotted: str) -> Any:
    value: Any = doc
    for part in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
