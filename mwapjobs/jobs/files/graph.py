"""Microsoft Graph (OneDrive, SharePoint): `GET /me/drive/root:{path}:/delta`, following
`@odata.nextLink` page by page; the last page's `@odata.deltaLink` is the next
incremental pass's starting point. `410 Gone` (`resyncRequired`) means the delta link
expired: a full pass. Graph's delta leaves `parentReference.path` out, so paths are
built from parent ids, starting from the folder's own id: a folder's delta begins with
the folder itself; failing that, a full pass reads it (`/me/drive/root:{path}`).

A link the answer hands back is followed only on the host of the base URL (and through
the outbound policy): a provider answer must not be able to send the bearer token
elsewhere. The base URL is the provider's `metadata.filesApiBaseUrl`, else
`https://graph.microsoft.com/v1.0`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, urlsplit

from .client import Connection, Missing, ProviderClient
from .decide import segments
from .model import Page, ProjectProblem
from .parse import MAX_ID, graph_item, text

GRAPH_API = "https://graph.microsoft.com/v1.0"
MAX_ENTRIES = 5000


class GraphLister:
    def __init__(self, client: ProviderClient, conn: Connection, folder: str,
                 page_size: int) -> None:
        self.client = client
        self.conn = conn
        self.folder = folder
        self.page_size = page_size
        parts = segments(folder)
        self._item = (f"{conn.base}/me/drive/root:/" + "/".join(quote(p, safe="") for p in parts)
                      if parts else f"{conn.base}/me/drive/root")
        self._origin = urlsplit(conn.base).netloc

    async def full(self, resume: dict[str, Any] | None) -> AsyncIterator[Page]:
        state = resume or {}
        root, link = state.get("rootId"), state.get("link")
        if not isinstance(link, str):
            delta = f"{self._item}:/delta" if segments(self.folder) else f"{self._item}/delta"
            link = f"{delta}?$top={self.page_size}"
        async for page in self._follow(root if isinstance(root, str) else None, link):
            yield page

    async def changes(self, cursor: dict[str, Any], resume: dict[str, Any] | None
                      ) -> AsyncIterator[Page]:
        state = resume or cursor
        root, link = state.get("rootId"), state.get("link")
        if not isinstance(root, str) or not isinstance(link, str):
            raise ProjectProblem("files/bad-cursor", "the stored delta link is missing")
        async for page in self._follow(root, link):
            yield page

    async def _root_id(self) -> str:
        try:
            answer = await self.client.call(self.conn, "GET", self._item)
        except Missing:
            raise ProjectProblem("files/folder-not-found",
                                 f"there is no folder {self.folder} in this drive") from None
        root = text(answer.get("id"), MAX_ID)
        if root is None or not isinstance(answer.get("folder") or answer.get("root"), dict):
            raise ProjectProblem("files/not-a-folder", f"{self.folder} is not a folder")
        return root

    async def _follow(self, root: str | None, link: str) -> AsyncIterator[Page]:
        """The pages from `link`. Without the folder's id (a full pass), the first page
        names it: a folder's delta starts with the folder itself; if it does not, the
        folder is read for it (one request)."""
        while True:
            try:
                answer = await self.client.call(self.conn, "GET", link)
            except Missing:
                raise ProjectProblem("files/folder-not-found",
                                     f"there is no folder {self.folder} in this drive") from None
            items = answer.get("value")
            if not isinstance(items, list) or len(items) > MAX_ENTRIES:
                raise ProjectProblem("provider/bad-answer",
                                     "Graph answered without a (bounded) value list")
            following, delta = answer.get("@odata.nextLink"), answer.get("@odata.deltaLink")
            nxt = self._link(following if following is not None else delta)
            if nxt is None:
                raise ProjectProblem("provider/bad-answer", "Graph answered without a next or "
                                     "delta link on the API's own host")
            done = not following
            if root is None:
                root = self._root_among(items) or await self._root_id()
            page = Page(resume={"rootId": root, "link": nxt}, done=done,
                        root=(root, self.folder))
            for raw in items:
                item = graph_item(raw)
                if item is None:
                    page.invalid += 1
                elif isinstance(item, str):
                    if item != root:
                        page.removed_ids.append(item)
                elif item.id != root:
                    page.entries.append(item)
            del answer, items  # not held while the page waits to be written
            yield page
            if done:
                return
            link = nxt

    def _root_among(self, items: list[Any]) -> str | None:
        """The project's folder in a delta page: the drive's root item (for `/`), or the
        folder of the folder's name whose parent is not in the page."""
        parts = segments(self.folder)
        ids = {i.get("id") for i in items if isinstance(i, dict)}
        for raw in items[:5]:
            if not isinstance(raw, dict) or not isinstance(raw.get("folder"), dict):
                continue
            reference = raw.get("parentReference")
            parent = reference.get("id") if isinstance(reference, dict) else None
            if (not parts and isinstance(raw.get("root"), dict)) or (
                    parts and raw.get("name") == parts[-1] and parent not in ids):
                return text(raw.get("id"), MAX_ID)
        return None

    def _link(self, value: Any) -> str | None:
        link = text(value, 8192)
        if link is None:
            return None
        try:
            parts = urlsplit(link)
        except ValueError:
            return None
        return link if parts.netloc == self._origin and parts.scheme in ("https", "http") \
            else None
