"""Google Drive: no folder id is stored on a project, so a full pass first resolves
`folderpath` from the root, one folder name at a time (`'<parent>' in parents and
name = '<name>' and mimeType = '<folder>' and trashed = false`): a name that matches no
folder, or more than one, is a per-project error (`ProjectProblem`), never a guess.

Then it takes a start page token (`changes/startPageToken`, before the walk, so that
nothing changed during the walk is missed) and walks the tree with `files.list`
(`'<id>' in parents and trashed = false`, `pageToken`, only the fields it keeps). The
folders still to list live in MongoDB (`mwapjobs_file_walk`, through `Frontier`), not
in memory; `resume` names the folder being listed and its page token, so a restart
continues with the page after the last one written.

An incremental pass follows `changes.list` from the stored page token
(`newStartPageToken` on its last page is the next one). Changes cover the whole drive:
the writer keeps only those under the project's folder, by the parent's path in the
index, removes what moved out or was trashed, and queues the folders new to the index
here; once every change is written (`barrier`), those folders are walked the same way
(a folder moved in arrives without its contents). A page token Drive no longer knows
(404, 410) means a full pass.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlencode

from ...storage.files import FileIndexStore
from .client import Connection, Missing, ProviderClient
from .decide import join, segments
from .model import CursorExpired, Page, ProjectProblem
from .parse import DRIVE_FOLDER, MAX_ID, drive_item, text

DRIVE_API = "https://www.googleapis.com/drive/v3"
FILE_FIELDS = "id,name,mimeType,size,modifiedTime,md5Checksum,parents,trashed,shared," \
              "permissions(type,role)"
MAX_ENTRIES = 5000
Barrier = Callable[[], Awaitable[None]]


def quoted(value: str) -> str:
    """A string literal of Drive's query language."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class Frontier:
    """The folders a walk has still to list, for one project, in MongoDB, in the order
    they were found (`seq`, increasing across restarts)."""

    def __init__(self, store: FileIndexStore, project_id: str) -> None:
        self.store = store
        self.project_id = project_id
        self._last = 0

    def _seq(self) -> int:
        self._last = max(time.time_ns(), self._last + 1)
        return self._last

    async def push(self, folders: list[tuple[str, str]]) -> None:
        await self.store.push_folders(self.project_id,
                                      [(self._seq(), fid, path) for fid, path in folders])

    async def next(self, after: tuple[int, str] | None) -> dict[str, Any] | None:
        found = await self.store.next_folder(self.project_id, after)
        if found is None:
            return None
        return {"seq": int(found["seq"]), "id": str(found["folderId"]),
                "path": str(found["path"])}

    async def clear(self) -> None:
        await self.store.clear_walk(self.project_id)


class DriveLister:
    def __init__(self, client: ProviderClient, conn: Connection, folder: str,
                 page_size: int, frontier: Frontier, barrier: Barrier) -> None:
        self.client = client
        self.conn = conn
        self.folder = folder
        self.page_size = page_size
        self.frontier = frontier
        self.barrier = barrier

    async def full(self, resume: dict[str, Any] | None) -> AsyncIterator[Page]:
        state = dict(resume or {})
        if not isinstance(state.get("folder"), dict):
            root = await self._resolve()
            answer = await self._get("changes/startPageToken", {})
            start = text(answer.get("startPageToken"), 4096)
            if start is None:
                raise ProjectProblem("provider/bad-answer", "Drive gave no start page token")
            state = {"rootId": root, "startToken": start, "pageToken": None,
                     "folder": {"seq": 0, "id": root, "path": self.folder}}
        async for page in self._walk(state):
            yield page

    async def changes(self, cursor: dict[str, Any], resume: dict[str, Any] | None
                      ) -> AsyncIterator[Page]:
        state = dict(resume or cursor)
        if isinstance(state.get("folder"), dict):  # the walk of new folders, resumed
            async for page in self._walk(state):
                yield page
            return
        root, token = state.get("rootId"), state.get("pageToken")
        if not isinstance(root, str) or not isinstance(token, str):
            raise ProjectProblem("files/bad-cursor", "the stored page token is missing")
        while True:
            answer = await self._get("changes", {
                "pageToken": token, "pageSize": self.page_size, "includeRemoved": "true",
                "spaces": "drive", "fields": "nextPageToken,newStartPageToken,"
                f"changes(removed,fileId,file({FILE_FIELDS}))"}, missing_is_expiry=True)
            raw_changes = answer.get("changes")
            if not isinstance(raw_changes, list) or len(raw_changes) > MAX_ENTRIES:
                raise ProjectProblem("provider/bad-answer", "Drive answered without changes")
            page = Page(root=(root, self.folder))
            for change in raw_changes:
                self._change(page, change)
            following = text(answer.get("nextPageToken"), 4096)
            if following is not None:
                token = following
                page.resume = {"rootId": root, "pageToken": token}
                yield page
                continue
            start = text(answer.get("newStartPageToken"), 4096)
            if start is None:
                raise ProjectProblem("provider/bad-answer",
                                     "Drive gave neither a next nor a new start page token")
            final = {"rootId": root, "pageToken": start}
            # The writer queues the folders new to the index; once every change is
            # written they are walked (a restart before that repeats one request).
            if not page.entries:
                await self.barrier()
                if await self.frontier.next(None) is None:
                    page.resume, page.done = final, True
                    yield page
                    return
            page.resume = final
            yield page
            await self.barrier()
            first = await self.frontier.next(None)
            if first is None:
                yield Page(resume=final, done=True, root=(root, self.folder))
                return
            walk = {"rootId": root, "startToken": start, "pageToken": None, "folder": first}
            async for walked in self._walk(walk):
                yield walked
            return

    def _change(self, page: Page, change: Any) -> None:
        if not isinstance(change, dict):
            page.invalid += 1
            return
        file_id = text(change.get("fileId"), MAX_ID)
        raw = change.get("file")
        if change.get("removed") is True or (isinstance(raw, dict) and raw.get("trashed")):
            if file_id is None:
                page.invalid += 1
            else:
                page.removed_ids.append(file_id)
            return
        entry = drive_item(raw)
        if entry is None:
            page.invalid += 1
        else:
            page.entries.append(entry)

    async def _walk(self, state: dict[str, Any]) -> AsyncIterator[Page]:
        root = str(state["rootId"])
        final = {"rootId": root, "pageToken": state["startToken"]}
        while True:
            folder = state["folder"]
            page = Page(root=(root, self.folder))
            try:
                answer = await self._get("files", {
                    "q": f"{quoted(folder['id'])} in parents and trashed = false",
                    "pageSize": self.page_size, "fields": f"nextPageToken,files({FILE_FIELDS})",
                    **({"pageToken": state["pageToken"]} if state.get("pageToken") else {})})
            except Missing:  # the folder went away during the walk: the changes say so
                answer = {"files": []}
            raw_files = answer.get("files")
            if not isinstance(raw_files, list) or len(raw_files) > MAX_ENTRIES:
                raise ProjectProblem("provider/bad-answer", "Drive answered without files")
            subfolders: list[tuple[str, str]] = []
            for raw in raw_files:
                name = text(raw.get("name")) if isinstance(raw, dict) else None
                entry = drive_item(raw, join(folder["path"], name)) if name else None
                if entry is None:
                    page.invalid += 1
                    continue
                page.entries.append(entry)
                if entry.folder and entry.path is not None:
                    subfolders.append((entry.id, entry.path))
            await self.frontier.push(subfolders)  # before the page: a restart finds them
            following = text(answer.get("nextPageToken"), 4096)
            if following is not None:
                state = {**state, "pageToken": following}
            else:
                nxt = await self.frontier.next((int(folder["seq"]), str(folder["id"])))
                if nxt is None:
                    page.resume, page.done = final, True
                    yield page
                    return
                state = {**state, "folder": nxt, "pageToken": None}
            page.resume = state
            del answer, raw_files  # not held while the page waits to be written
            yield page

    async def _resolve(self) -> str:
        """The id of the project's folder, from the root by folder names (the root's own
        id is asked for only when the project is the whole drive: `root` names it in a
        query, but changes name a file's parents by their real ids)."""
        current = "root"
        if not segments(self.folder):
            answer = await self._get("files/root", {"fields": "id"})
            found = text(answer.get("id"), MAX_ID)
            if found is None:
                raise ProjectProblem("provider/bad-answer", "Drive gave no id for the root")
            current = found
        walked = ""
        for name in segments(self.folder):
            answer = await self._get("files", {
                "q": f"{quoted(current)} in parents and name = {quoted(name)} and "
                     f"mimeType = '{DRIVE_FOLDER}' and trashed = false",
                "fields": "files(id,name)", "pageSize": 10})
            found = answer.get("files")
            matches = [f for f in found if isinstance(f, dict) and f.get("name") == name
                       and text(f.get("id"), MAX_ID)] if isinstance(found, list) else []
            where = walked or "/"
            if not matches:
                raise ProjectProblem("files/folder-not-found",
                                     f"no folder named {name!r} in {where} on Google Drive")
            if len(matches) > 1:
                raise ProjectProblem(
                    "files/folder-ambiguous",
                    f"{len(matches)} folders are named {name!r} in {where} on Google Drive, "
                    "so the project's folderpath is ambiguous; rename all but one")
            current, walked = str(matches[0]["id"]), join(walked or "/", name)
        return current

    async def _get(self, route: str, params: dict[str, Any], *,
                   missing_is_expiry: bool = False) -> dict[str, Any]:
        query = urlencode(params)
        url = f"{self.conn.base}/{route}{'?' + query if query else ''}"
        try:
            return await self.client.call(self.conn, "GET", url)
        except Missing as exc:
            if missing_is_expiry:
                raise CursorExpired(str(exc)) from None
            raise
