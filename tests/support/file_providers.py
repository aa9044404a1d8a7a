"""A local aiohttp server playing the file-listing APIs of Dropbox, Google Drive and
Microsoft Graph over simulated accounts (tests/support/file_tree.py).

Each account is a *tag* in the path, with its own `Tree`; `metadata(kind, tag)` is the
provider `metadata` that points the daemon there (`filesApiBaseUrl`):

- Dropbox: `POST /{tag}/dropbox/2/files/list_folder` (`path`, `recursive`, `limit`) and
  `.../list_folder/continue` (`cursor`): entries with `.tag` file/folder/deleted, a
  cursor and `has_more`; an expired cursor answers 409 `reset`, a missing folder 409
  `path/not_found`;
- Drive: `GET /{tag}/drive/v3/files/root`, `files?q=...` (the two query shapes the
  daemon sends, parsed strictly), `changes/startPageToken`, `changes?pageToken=` (every
  change of the account); an unknown page token answers 404;
- Graph: `GET /{tag}/graph/v1.0/me/drive/root:{path}` and `.../root:{path}:/delta`
  (`$top`, `token`): items with `parentReference.id` and no path (as Graph's delta),
  `@odata.nextLink`, `@odata.deltaLink`; an expired token answers 410 `resyncRequired`;
  a folder moved in from outside comes with its contents, one moved inside without.

Pages hold at most `min(asked, max_page)` items. Faults: `stale(token)` refuses a token
with each provider's own 401; `fail(tag, *faults)` answers the next requests of a tag
with `Fault`s (`rate_limited(kind, retry_after)` builds each provider's rate limit:
429 + `Retry-After`, Drive 403 `rateLimitExceeded`); `tree.expire()` expires cursors.
Every request is recorded (`requests`), with peaks in flight per tag; `latency` delays
each answer. `hold(tag)` makes a tag's requests wait until `release(tag)`.
`python -m tests.support.file_providers --port 0 --latency 0.05` serves it
in its own process (prints `PORT <n>`), seeded over `POST /_seed` and read over
`GET /_stats`, for the benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from tests.support.file_tree import ROOT, Item, Tree
from tests.support.local_server import LocalServer, serve_until_killed

DRIVE_FOLDER = "application/vnd.google-apps.folder"


@dataclass(frozen=True)
class Fault:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


def rate_limited(kind: str, retry_after: float = 1.0) -> Fault:
    if kind == "google":
        return Fault(403, {"error": {"code": 403, "message": "Rate Limit Exceeded",
                                     "errors": [{"domain": "usageLimits",
                                                 "reason": "rateLimitExceeded"}]}})
    body = {"error_summary": "too_many_requests/..", "error": {
        "reason": {".tag": "too_many_requests"}, "retry_after": retry_after}} \
        if kind == "dropbox" else {"error": {"code": "TooManyRequests", "message": "slow down"}}
    return Fault(429, body, {"Retry-After": f"{retry_after:g}"})


@dataclass
class Request:
    tag: str
    kind: str
    route: str
    token: str | None
    status: int = 0
    at: float = field(default_factory=time.monotonic)  # arrival


def _encode(value: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode()


def _decode(token: str) -> dict[str, Any] | None:
    try:
        value = json.loads(base64.urlsafe_b64decode(token.encode()))
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class FileProviderServer(LocalServer):
    def __init__(self, latency: float = 0.0, max_page: int = 1000, port: int = 0) -> None:
        super().__init__(port)
        self.latency = latency
        self.max_page = max_page
        self.trees: dict[str, Tree] = {}
        self.stale_tokens: set[str] = set()
        self.faults: dict[str, list[Fault]] = {}
        self.requests: list[Request] = []
        self.in_flight: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.gates: dict[str, asyncio.Event] = {}  # a tag whose requests wait (`hold`)
        self.graph_folder_first = True  # a Graph delta starts with the folder itself

    # -- lifecycle and set-up ----------------------------------------------------------

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/{tag}/dropbox/2/files/list_folder", self._dropbox_list)
        app.router.add_post("/{tag}/dropbox/2/files/list_folder/continue", self._dropbox_continue)
        app.router.add_get("/{tag}/drive/v3/files/root", self._drive_root)
        app.router.add_get("/{tag}/drive/v3/files", self._drive_files)
        app.router.add_get("/{tag}/drive/v3/changes/startPageToken", self._drive_start)
        app.router.add_get("/{tag}/drive/v3/changes", self._drive_changes)
        app.router.add_get("/{tag}/graph/v1.0/me/drive/{rest:.*}", self._graph)
        app.router.add_post("/_seed", self._seed)
        app.router.add_get("/_stats", self._stats)

    @property
    def url(self) -> str:
        return self.base_url

    def tree(self, tag: str) -> Tree:
        return self.trees.setdefault(tag, Tree(tag))

    def metadata(self, kind: str, tag: str) -> dict[str, Any]:
        route = {"dropbox": "dropbox/2", "google": "drive/v3", "microsoft": "graph/v1.0"}[kind]
        self.tree(tag)
        return {"providerType": kind, "filesApiBaseUrl": f"{self.url}/{tag}/{route}"}

    def stale(self, token: str) -> None:
        self.stale_tokens.add(token)

    def fail(self, tag: str, *faults: Fault) -> None:
        self.faults.setdefault(tag, []).extend(faults)

    def hold(self, tag: str) -> None:
        """The tag's requests wait (counted as arrived) until `release(tag)`."""
        self.gates[tag] = asyncio.Event()

    def release(self, tag: str) -> None:
        gate = self.gates.pop(tag, None)
        if gate is not None:
            gate.set()

    def count(self, tag: str | None = None, route: str | None = None) -> int:
        return sum(1 for r in self.requests if (tag is None or r.tag == tag)
                   and (route is None or r.route == route))

    def clear(self) -> None:
        self.requests.clear()
        self.peak.clear()

    # -- the common part of every answer ------------------------------------------------

    async def _enter(self, request: web.Request, kind: str, route: str
                     ) -> tuple[Tree, Request, web.Response | None]:
        tag = request.match_info["tag"]
        auth = request.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else None
        record = Request(tag, kind, route, token)
        self.requests.append(record)
        with contextlib.suppress(ConnectionError):
            await request.read()  # before waiting: a client gone meanwhile is no error here
        self.in_flight[tag] = self.in_flight.get(tag, 0) + 1
        self.peak[tag] = max(self.peak.get(tag, 0), self.in_flight[tag])
        try:
            if self.latency:
                await asyncio.sleep(self.latency)
            gate = self.gates.get(tag)
            if gate is not None:
                await gate.wait()
        finally:
            self.in_flight[tag] -= 1
        if tag not in self.trees:
            return self.tree(tag), record, self._json(record, 404, {"error": "no such account"})
        if token is None or token in self.stale_tokens:
            body = {"dropbox": {"error_summary": "expired_access_token/",
                                "error": {".tag": "expired_access_token"}},
                    "google": {"error": {"code": 401, "message": "Invalid Credentials",
                                         "errors": [{"reason": "authError"}]}},
                    "microsoft": {"error": {"code": "InvalidAuthenticationToken",
                                            "message": "Access token has expired."}}}[kind]
            return self.trees[tag], record, self._json(record, 401, body)
        queued = self.faults.get(tag)
        if queued:
            fault = queued.pop(0)
            return self.trees[tag], record, self._json(record, fault.status, fault.body,
                                                       fault.headers)
        return self.trees[tag], record, None

    def _json(self, record: Request, status: int, body: Any,
              headers: dict[str, str] | None = None) -> web.Response:
        record.status = status
        return web.json_response(body, status=status, headers=headers)

    def _limit(self, asked: Any) -> int:
        try:
            value = int(asked)
        except (TypeError, ValueError):
            value = self.max_page
        return max(1, min(value, self.max_page))

    # -- Dropbox -----------------------------------------------------------------------

    def _dropbox_entry(self, tree: Tree, item: Item) -> dict[str, Any]:
        path = tree.path(item.id)
        entry: dict[str, Any] = {".tag": "folder" if item.folder else "file", "name": item.name,
                                 "id": f"id:{item.id}", "path_lower": path.lower(),
                                 "path_display": path}
        if not item.folder:
            entry.update(size=item.size, content_hash=item.digest, rev=f"{item.version:09x}",
                         server_modified=item.modified.strftime("%Y-%m-%dT%H:%M:%SZ"),
                         client_modified=item.modified.strftime("%Y-%m-%dT%H:%M:%SZ"))
        if item.shared:
            entry["sharing_info"] = {"read_only": False, "parent_shared_folder_id": "84528192421"}
        return entry

    async def _dropbox_list(self, request: web.Request) -> web.Response:
        tree, record, early = await self._enter(request, "dropbox", "list_folder")
        if early is not None:
            return early
        body = await request.json()
        if request.content_type != "application/json" or body.get("recursive") is not True:
            return self._json(record, 400, {"error_summary": "bad request"})
        folder = body.get("path") or ""
        if folder and tree.find(folder, case_insensitive=True) is None:
            return self._json(record, 409, {"error_summary": "path/not_found/..", "error": {
                ".tag": "path", "path": {".tag": "not_found"}}})
        state = {"f": folder.lower(), "e": tree.epoch, "snap": tree.seq, "off": 0,
                 "n": self._limit(body.get("limit"))}
        return self._dropbox_page(tree, record, state)

    async def _dropbox_continue(self, request: web.Request) -> web.Response:
        tree, record, early = await self._enter(request, "dropbox", "list_folder/continue")
        if early is not None:
            return early
        state = _decode(str((await request.json()).get("cursor") or ""))
        if state is None:
            return self._json(record, 400, {"error_summary": "bad cursor"})
        if state["e"] != tree.epoch:
            return self._json(record, 409, {"error_summary": "reset/..",
                                            "error": {".tag": "reset"}})
        return self._dropbox_page(tree, record, state)

    def _dropbox_page(self, tree: Tree, record: Request, state: dict[str, Any]) -> web.Response:
        folder, limit = state["f"], state["n"]
        if state.get("off") is not None:  # the first listing, a page at a time
            base = tree.find(folder, case_insensitive=True) if folder else tree.items[ROOT]
            items = ([base] if folder and base else []) + (tree.below(base.id) if base else [])
            chunk = items[state["off"]:state["off"] + limit]
            more = state["off"] + limit < len(items)
            entries = [self._dropbox_entry(tree, i) for i in chunk]
            following = {**state, "off": state["off"] + limit} if more else \
                {**state, "off": None, "seq": state["snap"]}
        else:
            changes = [c for c in tree.changes(state["seq"], cascade=True)][:limit]
            entries = []
            for change, item in changes:
                now = tree.path(item.id) if item is not None else None
                if item is not None and now is not None and tree.under(now, folder):
                    entries.append(self._dropbox_entry(tree, item))
                if change.old_path and tree.under(change.old_path, folder) and (
                        item is None or change.old_path.lower() != (now or "").lower()):
                    entries.append({".tag": "deleted", "name": change.old_path.rsplit("/")[-1],
                                    "path_lower": change.old_path.lower(),
                                    "path_display": change.old_path})
            last = changes[-1][0].seq if changes else state["seq"]
            more = bool(changes) and last < tree.seq
            following = {**state, "seq": last if changes else state["seq"]}
        return self._json(record, 200, {"entries": entries, "cursor": _encode(following),
                                        "has_more": more})

    # -- Google Drive --------------------------------------------------------------------

    def _drive_file(self, tree: Tree, item: Item) -> dict[str, Any]:
        doc: dict[str, Any] = {"id": item.id, "name": item.name,
                               "mimeType": DRIVE_FOLDER if item.folder else "application/pdf",
                               "parents": [item.parent or ROOT], "trashed": False,
                               "modifiedTime": item.modified.isoformat().replace("+00:00", "Z"),
                               "shared": item.shared}
        if not item.folder:
            doc.update(size=str(item.size), md5Checksum=item.digest[:32])
        if item.shared:
            doc["permissions"] = [{"type": "user", "role": "owner"},
                                  {"type": "anyone", "role": "reader"}]
        return doc

    async def _drive_root(self, request: web.Request) -> web.Response:
        _tree, record, early = await self._enter(request, "google", "files/root")
        return early or self._json(record, 200, {"id": ROOT})

    async def _drive_files(self, request: web.Request) -> web.Response:
        tree, record, early = await self._enter(request, "google", "files")
        if early is not None:
            return early
        q = request.query.get("q", "")
        walk = re.fullmatch(r"'((?:[^'\\]|\\.)*)' in parents and trashed = false", q)
        named = re.fullmatch(r"'((?:[^'\\]|\\.)*)' in parents and name = '((?:[^'\\]|\\.)*)' "
                             rf"and mimeType = '{DRIVE_FOLDER}' and trashed = false", q)
        if walk is None and named is None:
            return self._json(record, 400, {"error": {"code": 400, "message": f"bad q: {q}"}})
        parent = _unescape((walk or named).group(1))  # type: ignore[union-attr]
        if parent not in tree.children:
            return self._json(record, 404, {"error": {"code": 404, "message": "File not found"}})
        children = [tree.items[c] for c in tree.children[parent]]
        if named is not None:
            name = _unescape(named.group(2))
            children = [c for c in children if c.folder and c.name == name]
        state = _decode(request.query.get("pageToken", "")) or {"off": 0}
        limit = self._limit(request.query.get("pageSize"))
        chunk = children[state["off"]:state["off"] + limit]
        body: dict[str, Any] = {"files": [self._drive_file(tree, c) for c in chunk]}
        if state["off"] + limit < len(children):
            body["nextPageToken"] = _encode({"off": state["off"] + limit})
        return self._json(record, 200, body)

    async def _drive_start(self, request: web.Request) -> web.Response:
        tree, record, early = await self._enter(request, "google", "changes/startPageToken")
        return early or self._json(record, 200, {"startPageToken": f"{tree.epoch}.{tree.seq}"})

    async def _drive_changes(self, request: web.Request) -> web.Response:
        tree, record, early = await self._enter(request, "google", "changes")
        if early is not None:
            return early
        epoch, _, seq = request.query.get("pageToken", "").partition(".")
        if epoch != str(tree.epoch) or not seq.isdigit():
            return self._json(record, 404, {"error": {"code": 404, "message": "not found"}})
        limit = self._limit(request.query.get("pageSize"))
        changes = tree.changes(int(seq), cascade=False)[:limit]
        out = [{"kind": "drive#change", "removed": True, "fileId": c.id} if item is None else
               {"kind": "drive#change", "removed": False, "fileId": c.id,
                "file": self._drive_file(tree, item)} for c, item in changes]
        last = changes[-1][0].seq if changes else int(seq)
        body: dict[str, Any] = {"changes": out}
        if changes and last < tree.seq:
            body["nextPageToken"] = f"{tree.epoch}.{last}"
        else:
            body["newStartPageToken"] = f"{tree.epoch}.{tree.seq}"
        return self._json(record, 200, body)

    # -- Microsoft Graph -----------------------------------------------------------------

    def _graph_item(self, tree: Tree, item: Item) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "id": item.id, "name": item.name,
            "lastModifiedDateTime": item.modified.isoformat().replace("+00:00", "Z"),
            "parentReference": {"id": item.parent or ROOT, "driveId": tree.name},
            "@microsoft.graph.downloadUrl": f"https://download.invalid/{item.id}?sig=secret"}
        if item.folder:
            doc["folder"] = {"childCount": len(tree.children.get(item.id, {}))}
        else:
            doc.update(size=item.size, file={"mimeType": "application/pdf",
                                             "hashes": {"quickXorHash": item.digest[:27]}})
        if item.shared:
            doc["shared"] = {"scope": "users"}
        if item.id == ROOT:
            doc["root"] = {}
        return doc

    async def _graph(self, request: web.Request) -> web.Response:
        rest = request.match_info["rest"]
        delta = rest.endswith("/delta")
        tree, record, early = await self._enter(request, "microsoft", "delta" if delta else "item")
        if early is not None:
            return early
        spec = rest[: -len("/delta")] if delta else rest
        spec = spec.removesuffix(":")
        if spec == "root":
            path = "/"
        elif spec.startswith("root:"):
            path = unquote(spec[len("root:"):])
        else:
            return self._json(record, 400, {"error": {"code": "invalidRequest"}})
        folder = tree.find(path)
        if folder is None or not folder.folder:
            return self._json(record, 404, {"error": {"code": "itemNotFound",
                                                      "message": "not found"}})
        if not delta:
            return self._json(record, 200, self._graph_item(tree, folder))
        token = request.query.get("token")
        limit = self._limit(request.query.get("$top"))
        link = f"{self.url}{request.path}?$top={limit}&token="
        if token is None:
            token = f"init.0.{tree.seq}.{tree.epoch}"
        parts = token.split(".")
        if parts[-1] != str(tree.epoch):
            return self._json(record, 410, {"error": {"code": "resyncRequired",
                                                      "message": "Resync required."}})
        if parts[0] == "init":
            off, snap = int(parts[1]), int(parts[2])
            items = [*([folder] if self.graph_folder_first else []), *tree.below(folder.id)]
            chunk = items[off:off + limit]
            body: dict[str, Any] = {"value": [self._graph_item(tree, i) for i in chunk]}
            if off + limit < len(items):
                body["@odata.nextLink"] = link + f"init.{off + limit}.{snap}.{tree.epoch}"
            else:
                body["@odata.deltaLink"] = link + f"{snap}.{tree.epoch}"
            return self._json(record, 200, body)
        base = tree.path(folder.id)
        changes = tree.changes(int(parts[0]), cascade=True)
        # A moved folder's descendants are reported only when they came in from outside
        # the delta's folder (new to it); inside it, only the folder itself moved.
        changes = [(c, i) for c, i in changes if not c.cascade or (
            i is not None and tree.under(tree.path(i.id), base)
            and not (c.old_path and tree.under(c.old_path, base)))][:limit]
        value = []
        for change, item in changes:
            now = tree.path(item.id) if item is not None else None
            if item is not None and now is not None and tree.under(now, base):
                value.append(self._graph_item(tree, item))
            elif change.old_path and tree.under(change.old_path, base):
                value.append({"id": change.id, "deleted": {"state": "deleted"},
                              "parentReference": {"driveId": tree.name}})
        last = changes[-1][0].seq if changes else int(parts[0])
        body = {"value": value}
        if changes and last < tree.seq:
            body["@odata.nextLink"] = link + f"{last}.{tree.epoch}"
        else:
            body["@odata.deltaLink"] = link + f"{tree.seq}.{tree.epoch}"
        return self._json(record, 200, body)

    # -- control (the benchmark's, from another process) ---------------------------------

    async def _seed(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.tree(body["tag"]).seed(body["folder"], int(body["files"]),
                                    int(body.get("folders", 0)))
        return web.json_response({"ok": True})

    async def _stats(self, request: web.Request) -> web.Response:
        by_route: dict[str, int] = {}
        for r in self.requests:
            by_route[r.route] = by_route.get(r.route, 0) + 1
        body: dict[str, Any] = {"requests": len(self.requests), "byRoute": by_route,
                                "peak": self.peak,
                                "statuses": sorted({r.status for r in self.requests})}
        if request.query.get("timeline"):
            body["timeline"] = [(r.tag, r.route, r.at) for r in self.requests]
        return web.json_response(body)


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", r"\1", value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--max-page", type=int, default=1000)
    args = parser.parse_args(argv)
    return serve_until_killed(FileProviderServer(args.latency, args.max_page, args.port))


if __name__ == "__main__":
    sys.exit(main())
