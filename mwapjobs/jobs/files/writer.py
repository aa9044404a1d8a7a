"""The index writer: one provider page into `virtualFiles`, in a few round trips
(storage/files.py says which), whatever the page holds.

For each page, in this order:
1. one read: the stored documents of the page's items, of the items it removes, and of
   the parent folders it needs a path for (Drive changes and Graph give parent ids, not
   paths); paths of folders seen in this pass are remembered (bounded);
2. each item is new (inserted), changed (its fields rewritten), or unchanged (a full
   pass marks it seen, so that the sweep at its end keeps it). An item whose parent is
   not under the project's folder is not the project's: if the index has it, it moved
   out and is removed. An item already indexed for another project of the same
   integration (nested project folders) is left to that project (`conflicts`);
3. a folder whose path changed (renamed or moved) takes its descendants along: their
   paths are rewritten in chunks (providers report only the folder);
4. removals, after the upserts (a Dropbox move is a deletion of the old path plus the
   item at its new path, in either order): by id, with the descendants of a removed
   folder, and by path for Dropbox (case-insensitively, as Dropbox paths are), never
   touching an item this page just wrote.

Counts (files, folders, bytes) change by exactly what was written, so the summary can
follow with `$inc`, and a page written twice (a restart between writing it and saving
the cursor) changes nothing the second time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from ...storage.files import CHUNK, FOLDER_TYPE, FileIndexStore, file_id
from .decide import MAX_PATH, differs, join
from .drive import Frontier
from .model import Entry, Page

MAX_REMEMBERED = 50_000  # folder paths kept in memory during a pass


@dataclass
class Written:
    added: int = 0
    changed: int = 0
    removed: int = 0
    unchanged: int = 0
    conflicts: int = 0  # items another project of the same integration holds
    unresolved: int = 0  # items whose parent is not (yet) known under the folder
    invalid: int = 0  # items of the answer refused as malformed
    files: int = 0  # change in the project's counts
    folders: int = 0
    size: int = 0

    def add(self, other: Written) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def count(self, doc: dict[str, Any], sign: int) -> None:
        if doc.get("type") == FOLDER_TYPE:
            self.folders += sign
        else:
            self.files += sign
            self.size += sign * int(doc.get("size") or 0)


def ms(moment: datetime) -> datetime:
    """To the millisecond, as MongoDB keeps dates."""
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


class IndexWriter:
    def __init__(self, store: FileIndexStore, *, project_id: str, integration_id: str,
                 provider_id: str, full: bool, mark: datetime, clock: Callable[[], datetime],
                 case_insensitive: bool = False, expand: Frontier | None = None,
                 fresh: bool = False) -> None:
        """`full`: a full pass started at `mark` (what it sees is marked so). `expand`:
        where folders new to the index are queued to be walked (Drive's changes).
        `fresh`: nothing of the project is indexed yet (a first full pass), so its items
        are inserted without being looked up first; should one exist after all, the page
        is written again the ordinary way, and so is every page after it."""
        self.store = store
        self.project_id = project_id
        self.integration_id = integration_id
        self.provider_id = provider_id
        self.full = full
        self.mark = mark
        self.clock = clock
        self.case_insensitive = case_insensitive
        self.expand = expand
        self.fresh = fresh
        self.root: tuple[str, str] | None = None
        self._folders: dict[str, str] = {}

    def know_root(self, root_id: str, path: str) -> None:
        """The project's folder and its provider id (from the stored cursor)."""
        self.root = (root_id, path)
        self._remember(root_id, path)

    def _remember(self, folder_id: str, path: str) -> None:
        if len(self._folders) >= MAX_REMEMBERED:
            self._forget()
        self._folders[folder_id] = path

    def _forget(self) -> None:
        self._folders.clear()
        if self.root is not None:
            self._folders[self.root[0]] = self.root[1]

    async def apply(self, page: Page) -> Written:
        out = Written(invalid=page.invalid)
        if page.root is not None and page.root != self.root:
            self.root = page.root
            self._remember(*page.root)
        now = ms(self.clock())
        seen_at = self.mark if self.full else now
        doc_ids = {e.id: file_id(self.integration_id, e.id) for e in page.entries}
        in_page = {e.id for e in page.entries if e.folder}
        parents = {e.parent for e in page.entries if e.path is None and e.parent
                   and e.parent not in self._folders and e.parent not in in_page}
        parent_ids = {file_id(self.integration_id, p): p for p in parents}
        removed = [file_id(self.integration_id, i) for i in page.removed_ids]
        lookup = [*parent_ids] if self.fresh else [*doc_ids.values(), *removed, *parent_ids]
        stored = await self.store.existing(lookup)
        for doc_id, parent in parent_ids.items():
            doc = stored.get(doc_id)
            if doc is not None and doc.get("type") == FOLDER_TYPE \
                    and doc.get("projectId") == self.project_id:
                self._remember(parent, str(doc.get("path")))

        inserts: list[dict[str, Any]] = []
        updates: list[tuple[str, dict[str, Any]]] = []
        seen: list[str] = []
        renames: list[tuple[str, str]] = []
        new_folders: list[tuple[str, str]] = []
        written: set[str] = set()
        gone: list[str] = list(removed)
        paths = self._paths(page.entries)
        for entry in page.entries:
            doc_id = doc_ids[entry.id]
            old = stored.get(doc_id)
            mine = old is not None and old.get("projectId") == self.project_id
            path = paths.get(entry.id)
            if path is None or len(path) > MAX_PATH:
                if mine:
                    gone.append(doc_id)  # it moved out of the project's folder
                else:
                    out.unresolved += 1
                continue
            if old is not None and not mine:
                out.conflicts += 1
                continue
            if entry.folder:
                self._remember(entry.id, path)
            values = self._fields(entry, path)
            written.add(doc_id)
            if old is None:
                inserts.append({"_id": doc_id, "projectId": self.project_id,
                                "integrationId": self.integration_id,
                                "providerId": self.provider_id, "providerFileId": entry.id,
                                **values, "syncStatus": {"lastSync": seen_at, "status": "synced"},
                                "createdAt": now, "updatedAt": now})
                if entry.folder and self.expand is not None:
                    new_folders.append((entry.id, path))
            elif differs(old, values):
                updates.append((doc_id, {**values, "syncStatus": {"lastSync": seen_at,
                                                                  "status": "synced"},
                                         "updatedAt": now}))
                out.changed += 1
                out.count(old, -1)
                out.count(values, +1)
                if entry.folder and old.get("path") != path and isinstance(old.get("path"), str):
                    renames.append((str(old["path"]), path))
            else:
                seen.append(doc_id)
                out.unchanged += 1

        taken = await self.store.insert(inserts)
        if taken and self.fresh:
            self.fresh = False
            return await self.apply(page)
        for doc in inserts:
            if str(doc["_id"]) in taken:  # another writer was quicker: that one stands
                out.conflicts += 1
                written.discard(str(doc["_id"]))
            else:
                out.added += 1
                out.count(doc, +1)
        await self.store.update(updates)
        if self.full:
            await self.store.mark_seen(seen, self.mark)
        for old_path, new_path in renames:  # this page's items too: a child written
            await self._move_below(old_path, new_path, now)  # before its folder moved
        await self._remove(gone, stored, written, out)
        for path in page.removed_paths:
            await self._remove_below(path, written, out, case_insensitive=self.case_insensitive)
        if new_folders and self.expand is not None:
            await self.expand.push(new_folders)
        return out

    def _paths(self, entries: list[Entry]) -> dict[str, str]:
        """Each item's path: its own, else its parent's (a folder of this page, in any
        order, or one remembered or read) joined with its name."""
        by_id = {e.id: e for e in entries}
        found: dict[str, str] = {}

        def resolve(entry: Entry, depth: int = 0) -> str | None:
            if entry.id in found:
                return found[entry.id]
            if entry.path is not None:
                path: str | None = entry.path
            elif entry.parent is None or depth > 64:
                path = None
            elif entry.parent in self._folders:
                path = join(self._folders[entry.parent], entry.name)
            elif entry.parent in by_id and by_id[entry.parent].folder:
                base = resolve(by_id[entry.parent], depth + 1)
                path = join(base, entry.name) if base is not None else None
            else:
                path = None
            if path is not None:
                found[entry.id] = path
            return path

        for entry in entries:
            resolve(entry)
        return found

    @staticmethod
    def _fields(entry: Entry, path: str) -> dict[str, Any]:
        metadata: dict[str, Any] = {"permissions": list(entry.permissions)}
        if entry.checksum is not None:
            metadata["checksum"] = entry.checksum
        return {"name": entry.name, "path": path,
                "type": FOLDER_TYPE if entry.folder else (entry.mime or
                                                          "application/octet-stream"),
                "size": entry.size, "modifiedTime": entry.modified, "metadata": metadata}

    async def _move_below(self, old: str, new: str, now: datetime) -> None:
        """Rewrite the paths of everything below a folder that moved from `old` to `new`."""
        self._forget()  # remembered paths below it are stale now
        after: str | None = None
        while True:
            docs = await self.store.below(self.project_id, old, after=after)
            docs = [d for d in docs if d.get("path") != old]
            values = [(str(d["_id"]), {"path": new + str(d["path"])[len(old):],
                                       "updatedAt": now}) for d in docs]
            await self.store.update(values)
            if len(docs) < CHUNK:
                return
            after = str(docs[-1]["_id"])

    async def _remove(self, doc_ids: list[str], stored: dict[str, dict[str, Any]],
                      written: set[str], out: Written) -> None:
        mine = [stored[i] for i in doc_ids if i in stored and i not in written
                and stored[i].get("projectId") == self.project_id]
        if not mine:
            return
        for doc in mine:
            out.count(doc, -1)
        out.removed += await self.store.delete([str(d["_id"]) for d in mine])
        for doc in mine:
            if doc.get("type") == FOLDER_TYPE and isinstance(doc.get("path"), str):
                await self._remove_below(str(doc["path"]), written, out)

    async def _remove_below(self, path: str, written: set[str], out: Written, *,
                            case_insensitive: bool = False) -> None:
        while True:
            docs = await self.store.below(self.project_id, path, exclude=sorted(written),
                                          case_insensitive=case_insensitive)
            if not docs:
                return
            for doc in docs:
                out.count(doc, -1)
            out.removed += await self.store.delete([str(d["_id"]) for d in docs])
            if len(docs) < CHUNK:
                return

    async def sweep(self) -> Written:
        """After a full pass: remove what it did not see (in chunks)."""
        out = Written()
        while True:
            docs = await self.store.stale(self.project_id, self.mark)
            if not docs:
                return out
            for doc in docs:
                out.count(doc, -1)
            out.removed += await self.store.delete([str(d["_id"]) for d in docs])
