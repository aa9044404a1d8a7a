"""Dropbox: `POST /2/files/list_folder` with `recursive: true` for a full pass, then
`list_folder/continue` with the stored cursor, which answers only what changed
(deletions included, by path). An expired cursor answers 409 `reset`: a full pass.

Every answer is one `Page`, whose `resume` is `{"cursor": ...}`: a full pass
interrupted midway continues with the cursor of its last written page, and the cursor
of the last page (`has_more: false`) is the next incremental pass's starting point.
The base URL is the provider's `metadata.filesApiBaseUrl`, else its `apiBaseUrl` (as
MWAP uses it), else `https://api.dropboxapi.com/2`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from .client import Connection, Missing, ProviderClient
from .model import Entry, Page, ProjectProblem
from .parse import dropbox_item, text

DROPBOX_API = "https://api.dropboxapi.com/2"
MAX_ENTRIES = 5000  # items accepted in one answer


class DropboxLister:
    def __init__(self, client: ProviderClient, conn: Connection, folder: str,
                 page_size: int) -> None:
        self.client = client
        self.conn = conn
        self.folder = folder
        self.page_size = page_size

    async def full(self, resume: dict[str, Any] | None) -> AsyncIterator[Page]:
        cursor = (resume or {}).get("cursor")
        if not isinstance(cursor, str):
            answer = await self._call("files/list_folder", {
                "path": "" if self.folder == "/" else self.folder, "recursive": True,
                "include_deleted": False, "include_mounted_folders": True,
                "limit": min(2000, self.page_size)})
            page, cursor = self._page(answer)
            del answer  # not held while the page waits to be written (bounded memory)
            yield page
            if page.done:
                return
        async for page in self._continue(cursor):
            yield page

    async def changes(self, cursor: dict[str, Any], resume: dict[str, Any] | None
                      ) -> AsyncIterator[Page]:
        start = (resume or cursor).get("cursor")
        if not isinstance(start, str):
            raise ProjectProblem("files/bad-cursor", "the stored Dropbox cursor is missing")
        async for page in self._continue(start):
            yield page

    async def _continue(self, cursor: str) -> AsyncIterator[Page]:
        while True:
            answer = await self._call("files/list_folder/continue", {"cursor": cursor})
            page, cursor = self._page(answer)
            del answer  # not held while the page waits to be written (bounded memory)
            yield page
            if page.done:
                return

    async def _call(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self.client.call(self.conn, "POST", f"{self.conn.base}/{route}", body)
        except Missing:
            raise ProjectProblem("files/folder-not-found",
                                 f"there is no folder {self.folder} in this Dropbox") from None

    def _page(self, answer: dict[str, Any]) -> tuple[Page, str]:
        raw_entries, cursor = answer.get("entries"), text(answer.get("cursor"), 8192)
        more = answer.get("has_more")
        if not isinstance(raw_entries, list) or cursor is None or not isinstance(more, bool):
            raise ProjectProblem("provider/bad-answer",
                                 "Dropbox answered without entries, cursor or has_more")
        if len(raw_entries) > MAX_ENTRIES:
            raise ProjectProblem("provider/bad-answer",
                                 f"Dropbox answered {len(raw_entries)} entries in one page")
        page = Page(resume={"cursor": cursor}, done=not more)
        own = self.folder.lower()
        for raw in raw_entries:
            item = dropbox_item(raw)
            if item is None:
                page.invalid += 1
            elif isinstance(item, str):
                page.removed_paths.append(item)
            elif isinstance(item, Entry) and item.path is not None \
                    and item.path.lower() != own:  # the folder itself is the project
                page.entries.append(item)
        return page, cursor
