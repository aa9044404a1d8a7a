"""The files of one simulated cloud account, for tests/support/file_providers.py.

A `Tree` holds folders and files by id, with a change log: every add, modify, move and
delete appends `(seq, item id, the item's path before the change)`. The three provider
views read the same tree and log the way each provider reports changes:

- Dropbox reports a moved folder's descendants too (`cascade` log entries), and a
  deletion by the path the item had;
- Drive reports every change of the whole drive (the client filters), and only the
  folder of a moved folder;
- Graph reports changes under the delta's folder, and only the folder of a moved one.

    tree = Tree("acct")
    tree.add("/Projects/A/report.pdf", size=1200)
    tree.move("/Projects/A/report.pdf", "/Projects/A/Old/report.pdf")
    tree.delete("/Projects/A/Old")
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

ROOT = "root"
_BASE = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass(slots=True)
class Item:
    id: str
    name: str
    parent: str | None
    folder: bool
    size: int = 0
    version: int = 1
    shared: bool = False
    modified: datetime = _BASE

    @property
    def digest(self) -> str:
        return hashlib.sha256(f"{self.id}:{self.version}".encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Change:
    seq: int
    id: str
    old_path: str | None  # the path before the change (None for a new item)
    cascade: bool = False  # logged because an ancestor moved (Dropbox reports these)


@dataclass
class Tree:
    name: str
    items: dict[str, Item] = field(default_factory=dict)
    children: dict[str, dict[str, None]] = field(default_factory=dict)
    gone: dict[str, Item] = field(default_factory=dict)  # deleted items, for their last state
    log: list[Change] = field(default_factory=list)
    epoch: int = 0  # cursors of an older epoch have expired
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        self.items[ROOT] = Item(ROOT, "", None, True)
        self.children[ROOT] = {}

    @property
    def seq(self) -> int:
        return self.log[-1].seq if self.log else 0

    # -- reading ---------------------------------------------------------------------

    def path(self, item_id: str) -> str:
        parts: list[str] = []
        item = self.items.get(item_id) or self.gone[item_id]
        while item.parent is not None:
            parts.append(item.name)
            item = self.items.get(item.parent) or self.gone[item.parent]
        return "/" + "/".join(reversed(parts))

    def find(self, path: str, *, case_insensitive: bool = False) -> Item | None:
        item = self.items[ROOT]
        for name in [p for p in path.split("/") if p]:
            match = [self.items[c] for c in self.children.get(item.id, {})
                     if (self.items[c].name.lower() == name.lower() if case_insensitive
                         else self.items[c].name == name)]
            if len(match) != 1:
                return None
            item = match[0]
        return item

    def get(self, path: str) -> Item:
        item = self.find(path)
        assert item is not None, f"no {path} in {self.name}"
        return item

    def below(self, folder_id: str) -> list[Item]:
        """Everything under a folder, parents before children (breadth first)."""
        out: list[Item] = []
        queue = [folder_id]
        while queue:
            current = queue.pop(0)
            for child in self.children.get(current, {}):
                item = self.items[child]
                out.append(item)
                if item.folder:
                    queue.append(child)
        return out

    def under(self, path: str, folder: str) -> bool:
        folder = folder.rstrip("/").lower()
        return folder == "" or path.lower() == folder or path.lower().startswith(folder + "/")

    def changes(self, after: int, *, cascade: bool) -> list[tuple[Change, Item | None]]:
        """The changes after `seq`, one per item (its latest), with its state now (None
        when deleted), in the order of their last change."""
        latest: dict[str, tuple[Change, str | None, bool]] = {}
        for change in self.log:
            if change.seq <= after or (change.cascade and not cascade):
                continue
            known = latest.pop(change.id, None)
            first_old = known[1] if known else change.old_path
            only_cascade = (known[2] if known else True) and change.cascade
            latest[change.id] = (change, first_old, only_cascade)
        return [(Change(c.seq, c.id, old, only), self.items.get(c.id))
                for c, old, only in latest.values()]

    # -- changing --------------------------------------------------------------------

    def _record(self, item_id: str, old_path: str | None, cascade: bool = False) -> None:
        self.log.append(Change(self.seq + 1, item_id, old_path, cascade))

    def _new_id(self) -> str:
        return f"{self.name}-{next(self._ids)}"

    def mkdir(self, path: str, *, duplicate: bool = False) -> Item:
        """Make a folder (and its parents); `duplicate` makes another one of the same
        name even if it exists (Drive allows that)."""
        parent = self.items[ROOT]
        names = [p for p in path.split("/") if p]
        for depth, name in enumerate(names):
            last = depth == len(names) - 1
            existing = None if (duplicate and last) else self.find(
                "/" + "/".join(names[:depth + 1]))
            if existing is None:
                existing = Item(self._new_id(), name, parent.id, True, modified=self._now())
                self._insert(existing)
            parent = existing
        return parent

    def add(self, path: str, size: int = 100, *, shared: bool = False) -> Item:
        folder, _, name = path.rpartition("/")
        parent = self.mkdir(folder) if folder else self.items[ROOT]
        item = Item(self._new_id(), name, parent.id, False, size=size, shared=shared,
                    modified=self._now())
        self._insert(item)
        return item

    def _insert(self, item: Item) -> None:
        self.items[item.id] = item
        self.children.setdefault(item.parent or ROOT, {})[item.id] = None
        if item.folder:
            self.children.setdefault(item.id, {})
        self._record(item.id, None)

    def modify(self, path: str, size: int | None = None) -> Item:
        item = self.get(path)
        item.version += 1
        item.size = item.size + 1 if size is None else size
        item.modified = self._now()
        self._record(item.id, path)
        return item

    def move(self, path: str, new_path: str) -> Item:
        item = self.get(path)
        folder, _, name = new_path.rpartition("/")
        target = self.mkdir(folder) if folder else self.items[ROOT]
        old_paths = {d.id: self.path(d.id) for d in self.below(item.id)} if item.folder else {}
        del self.children[item.parent or ROOT][item.id]
        item.parent, item.name = target.id, name
        self.children[target.id][item.id] = None
        self._record(item.id, path)
        for descendant, old in old_paths.items():
            self._record(descendant, old, cascade=True)
        return item

    def delete(self, path: str) -> None:
        item = self.get(path)
        doomed = [*reversed(self.below(item.id)), item] if item.folder else [item]
        paths = {d.id: self.path(d.id) for d in doomed}
        for victim in doomed:
            del self.children[victim.parent or ROOT][victim.id]
            self.children.pop(victim.id, None)
            self.gone[victim.id] = self.items.pop(victim.id)
            self._record(victim.id, paths[victim.id], cascade=victim is not item)

    def expire(self) -> None:
        """Every cursor given so far expires (Dropbox `reset`, Graph 410)."""
        self.epoch += 1

    def seed(self, folder: str, files: int, folders: int = 0, size: int = 1000) -> None:
        """Many files at once (the benchmark's), spread over `folders` subfolders."""
        base = self.mkdir(folder)
        parents = [base] + [self.mkdir(f"{folder}/d{n}") for n in range(folders)]
        for n in range(files):
            parent = parents[n % len(parents)]
            item = Item(self._new_id(), f"f{n}.bin", parent.id, False, size=size)
            self._insert(item)

    def _now(self) -> datetime:
        return _BASE + timedelta(seconds=self.seq + 1)
