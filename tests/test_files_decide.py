"""File indexing's pure parts as tables: what a provider answer means, when to retry,
who is indexed, which pass a run makes, how provider items are read (and refused), and
the one-page-ahead feed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from bson import ObjectId

from mwapjobs.jobs.files.decide import (
    Outcome,
    differs,
    folder_path,
    ineligible,
    plan,
    read_answer,
    retry_after,
    retry_wait,
)
from mwapjobs.jobs.files.feed import Feed
from mwapjobs.jobs.files.model import Entry, Page
from mwapjobs.jobs.files.parse import drive_item, dropbox_item, graph_item, when
from mwapjobs.storage.files import file_id

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)

DRIVE_RATE = {"error": {"code": 403, "errors": [{"reason": "rateLimitExceeded"}]}}
DRIVE_DENIED = {"error": {"code": 403, "errors": [{"reason": "insufficientFilePermissions"}]}}
DROPBOX_RESET = {"error_summary": "reset/..", "error": {".tag": "reset"}}
DROPBOX_MISSING = {"error_summary": "path/not_found/..", "error": {".tag": "path"}}
GRAPH_GONE = {"error": {"code": "resyncRequired", "message": "Resync required"}}

# status, headers, body → outcome, retry_after
ANSWERS: list[tuple[int, dict[str, str], Any, Outcome, float | None]] = [
    (200, {}, {"entries": []}, "ok", None),
    (200, {}, ["not", "an", "object"], "bad_answer", None),
    (200, {}, None, "bad_answer", None),
    (401, {}, {"error": {"code": "InvalidAuthenticationToken"}}, "unauthorized", None),
    (429, {"Retry-After": "7"}, {}, "rate_limited", 7.0),
    (429, {}, {"error": {"retry_after": 3}}, "rate_limited", 3.0),  # Dropbox's body
    (429, {}, None, "rate_limited", None),
    (503, {"Retry-After": "2"}, None, "rate_limited", 2.0),
    (503, {}, None, "server_error", None),
    (403, {}, DRIVE_RATE, "rate_limited", None),
    (403, {}, DRIVE_DENIED, "forbidden", None),
    (409, {}, DROPBOX_RESET, "cursor_expired", None),
    (410, {}, GRAPH_GONE, "cursor_expired", None),
    (409, {}, DROPBOX_MISSING, "not_found", None),
    (404, {}, {"error": {"code": "itemNotFound"}}, "not_found", None),
    (409, {}, {"error_summary": "other/.."}, "server_error", None),
    (500, {}, "<html>", "server_error", None),
    (400, {}, {"error": "invalid_request"}, "refused", None),
    (302, {"Location": "https://elsewhere.example/"}, None, "refused", None),
]


@pytest.mark.parametrize(("status", "headers", "body", "outcome", "wait"), ANSWERS)
def test_what_an_answer_means(status: int, headers: dict[str, str], body: Any,
                              outcome: Outcome, wait: float | None) -> None:
    verdict = read_answer(status, headers, body, now=NOW)
    assert (verdict.outcome, verdict.retry_after) == (outcome, wait)


def test_retry_after_as_an_http_date_and_nonsense() -> None:
    later = "Tue, 01 Dec 2026 12:00:30 GMT"
    assert retry_after({"Retry-After": later}, None, NOW) == 30.0
    assert retry_after({"Retry-After": "soon"}, None, NOW) is None
    assert retry_after({"Retry-After": "-5"}, None, NOW) == 0.0
    assert retry_after({"Retry-After": "1e12"}, None, NOW) == 86400.0
    assert retry_after({"Retry-After": "nan"}, None, NOW) is None
    assert retry_after({}, {"error": {"retry_after": True}}, NOW) is None


# outcome, provider's wait, attempt → seconds before the next send (None: stop here)
RETRIES: list[tuple[Outcome, float | None, int, float | None]] = [
    ("rate_limited", 2.0, 1, 2.0),
    ("rate_limited", None, 1, 0.5),
    ("rate_limited", None, 3, 2.0),
    ("rate_limited", 600.0, 1, None),  # longer than max_wait: the run is retried later
    ("rate_limited", 2.0, 4, None),  # tries used up
    ("server_error", None, 2, 1.0),
    ("network", None, 1, 0.5),
    ("unauthorized", None, 1, None),  # the refresh path, not a retry
    ("forbidden", None, 1, None),
    ("refused", None, 1, None),
    ("not_found", None, 1, None),
]


@pytest.mark.parametrize(("outcome", "wait", "attempt", "expected"), RETRIES)
def test_when_to_send_again(outcome: Outcome, wait: float | None, attempt: int,
                            expected: float | None) -> None:
    assert retry_wait(outcome, wait, attempt, tries=4, max_wait=120.0) == expected


TENANT = str(ObjectId())
PROJECT = {"_id": "p1", "tenantId": TENANT, "cloudIntegrationId": "i1",
           "folderpath": "/Projects/A"}
CONNECTED = {"_id": "i1", "tenantId": TENANT, "status": "active", "accessToken": "enc"}
ELIGIBILITY: list[tuple[dict[str, Any], dict[str, Any] | None, str | None]] = [
    (PROJECT, CONNECTED, None),
    ({**PROJECT, "tenantId": ObjectId(TENANT)}, CONNECTED, None),  # ids compared as strings
    ({**PROJECT, "archived": True}, CONNECTED, "the project is archived"),
    ({**PROJECT, "cloudIntegrationId": None}, CONNECTED,
     "the project names no cloud integration"),
    ({**PROJECT, "folderpath": "Projects/A"}, CONNECTED,
     "the project's folderpath is not an absolute path"),
    (PROJECT, None, "the project's integration does not exist"),
    (PROJECT, {**CONNECTED, "tenantId": str(ObjectId())},
     "the project's integration belongs to another tenant"),
    (PROJECT, {**CONNECTED, "status": "revoked"}, "the integration is revoked"),
    (PROJECT, {**CONNECTED, "accessToken": None}, "the integration is not connected"),
    (PROJECT, {**CONNECTED, "status": "expired"}, None),  # a 401 will refresh it
]


@pytest.mark.parametrize(("project", "integration", "reason"), ELIGIBILITY)
def test_who_is_indexed(project: dict[str, Any], integration: dict[str, Any] | None,
                        reason: str | None) -> None:
    assert ineligible(project, integration) == reason


CONFIG = {"integrationId": "i1", "folderpath": "/A", "kind": "dropbox"}
CURSOR = {**CONFIG, "value": {"cursor": "c"}}
FRESH = NOW - timedelta(hours=1)
STALE = NOW - timedelta(days=2)
# requested, pass in progress, cursor, last full pass → (mode, resume)
PLANS: list[tuple[str, Any, Any, datetime | None, tuple[str, bool]]] = [
    ("auto", None, None, None, ("full", False)),
    ("auto", None, CURSOR, FRESH, ("incremental", False)),
    ("auto", None, CURSOR, STALE, ("full", False)),
    ("full", None, CURSOR, FRESH, ("full", False)),
    ("incremental", None, None, None, ("full", False)),  # nothing to follow yet
    ("auto", None, {**CURSOR, "folderpath": "/B"}, FRESH, ("full", False)),  # moved folder
    ("auto", None, {**CURSOR, "integrationId": "i2"}, FRESH, ("full", False)),
    ("auto", {**CONFIG, "mode": "full"}, None, None, ("full", True)),
    ("auto", {**CONFIG, "mode": "incremental"}, CURSOR, FRESH, ("incremental", True)),
    ("full", {**CONFIG, "mode": "incremental"}, CURSOR, FRESH, ("full", False)),
    ("incremental", {**CONFIG, "mode": "full"}, CURSOR, FRESH, ("full", True)),
    ("auto", {**CONFIG, "folderpath": "/B", "mode": "full"}, CURSOR, FRESH,
     ("incremental", False)),  # a pass for another folder is not resumed
]


@pytest.mark.parametrize(("requested", "in_progress", "cursor", "last_full", "expected"), PLANS)
def test_which_pass(requested: str, in_progress: Any, cursor: Any, last_full: datetime | None,
                    expected: tuple[str, bool]) -> None:
    chosen = plan(requested, in_progress, cursor, CONFIG, last_full, NOW, 86400.0)
    assert (chosen.mode, chosen.resume) == expected


@pytest.mark.parametrize(("raw", "path"), [
    ("/", "/"), ("/Projects/A", "/Projects/A"), ("/Projects//A/", "/Projects/A"),
    ("Projects", None), ("/a/../b", None), ("/a/./b", None), ("/a\nb", None), (None, None),
    (7, None), ("/" + "x" * 5000, None),
])
def test_folder_paths(raw: Any, path: str | None) -> None:
    assert folder_path(raw) == path


def test_differs_compares_every_kept_field() -> None:
    stored = {"name": "a", "size": 1, "metadata": {"permissions": []}, "other": "x"}
    assert not differs(stored, {"name": "a", "size": 1, "metadata": {"permissions": []}})
    assert differs(stored, {"name": "a", "size": 2, "metadata": {"permissions": []}})
    assert differs(stored, {"name": "a", "size": 1, "metadata": {"permissions": ["shared"]}})


def test_document_ids_are_stable_per_integration_and_item() -> None:
    assert file_id("i1", "f1") == file_id("i1", "f1")
    assert len({file_id("i1", "f1"), file_id("i2", "f1"), file_id("i1", "f2")}) == 3
    assert len(file_id("i1", "f1")) == 24


def test_dates_are_utc_to_the_millisecond() -> None:
    assert when("2026-03-01T10:00:00.123456Z") == datetime(2026, 3, 1, 10, 0, 0, 123000, UTC)
    assert when("2026-03-01T12:00:00+02:00") == datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
    assert when("2026-03-01T10:00:00") is None  # no zone: refused, not guessed
    assert when("yesterday") is None and when(12) is None


DBX_FILE = {".tag": "file", "name": "a.pdf", "id": "id:1", "path_lower": "/p/a.pdf",
            "path_display": "/P/a.pdf", "size": 10, "content_hash": "h",
            "server_modified": "2026-01-01T00:00:00Z"}


@pytest.mark.parametrize(("raw", "expected"), [
    (DBX_FILE, Entry("id:1", "a.pdf", False, "/P/a.pdf", None, "application/pdf", 10,
                     datetime(2026, 1, 1, tzinfo=UTC), "h")),
    ({**DBX_FILE, "sharing_info": {"read_only": True}},
     Entry("id:1", "a.pdf", False, "/P/a.pdf", None, "application/pdf", 10,
           datetime(2026, 1, 1, tzinfo=UTC), "h", ("shared", "read_only"))),
    ({".tag": "folder", "name": "S", "id": "id:2", "path_lower": "/p/s", "path_display": "/P/S"},
     Entry("id:2", "S", True, "/P/S", None, "inode/directory")),
    ({".tag": "deleted", "name": "x", "path_lower": "/p/x"}, "/p/x"),
    ({**DBX_FILE, "size": -1}, None),
    ({**DBX_FILE, "size": "10"}, None),
    ({**DBX_FILE, "id": 5}, None),
    ({**DBX_FILE, "name": "x" * 2000}, None),
    ({**DBX_FILE, ".tag": "symlink"}, None),
    ("not a dict", None),
])
def test_dropbox_items(raw: Any, expected: Any) -> None:
    assert dropbox_item(raw) == expected


DRIVE_FILE = {"id": "d1", "name": "a.txt", "mimeType": "text/plain", "size": "42",
              "parents": ["p0"], "md5Checksum": "m", "modifiedTime": "2026-01-01T00:00:00.5Z",
              "permissions": [{"type": "user", "role": "owner"},
                              {"type": "anyone", "role": "reader"}]}


def test_drive_items() -> None:
    entry = drive_item(DRIVE_FILE)
    assert entry is not None
    assert (entry.size, entry.parent, entry.checksum, entry.path, entry.permissions) == (
        42, "p0", "m", None, ("anyone:reader", "user:owner"))
    folder = drive_item({"id": "d2", "name": "F",
                         "mimeType": "application/vnd.google-apps.folder"}, "/P/F")
    assert folder is not None and folder.folder and folder.mime == "inode/directory"
    assert folder.path == "/P/F" and folder.size is None
    assert drive_item({**DRIVE_FILE, "size": "12abc"}) is not None  # a bad size is dropped
    assert drive_item({**DRIVE_FILE, "size": "12abc"}).size is None  # type: ignore[union-attr]
    assert drive_item({**DRIVE_FILE, "mimeType": None}) is None
    assert drive_item({**DRIVE_FILE, "permissions": "all"}).permissions == ()  # type: ignore[union-attr]


def test_graph_items_keep_no_download_url() -> None:
    raw = {"id": "g1", "name": "a.pdf", "size": 9, "parentReference": {"id": "g0"},
           "file": {"mimeType": "application/pdf",
                    "hashes": {"quickXorHash": "q", "sha1Hash": "s1"}},
           "shared": {"scope": "users"}, "lastModifiedDateTime": "2026-01-01T00:00:00Z",
           "@microsoft.graph.downloadUrl": "https://download.example/secret"}
    entry = graph_item(raw)
    assert isinstance(entry, Entry)
    assert (entry.checksum, entry.permissions, entry.parent) == ("s1", ("shared:users",), "g0")
    assert "download" not in repr(entry)
    assert graph_item({"id": "g2", "deleted": {"state": "deleted"}}) == "g2"
    assert graph_item({"id": "g3", "name": "x"}) is None  # neither a file nor a folder
    assert graph_item({"id": "g4", "name": "F", "folder": {}}).folder  # type: ignore[union-attr]


async def test_the_feed_runs_one_page_ahead_and_no_further() -> None:
    made: list[int] = []

    def pages(barrier: Callable[[], Awaitable[None]]) -> AsyncIterator[Page]:
        async def gen() -> AsyncIterator[Page]:
            for n in range(5):
                made.append(n)
                yield Page(resume={"n": n}, done=n == 4)
        return gen()

    async with Feed(pages) as feed:
        first = await feed.next()
        await asyncio.sleep(0.05)  # the writer is slow: the lister may not run away
        assert first is not None and first.resume == {"n": 0}
        assert len(made) <= 3  # the one being written, one waiting, one being made
        seen = [0]
        while (page := await feed.next()) is not None:
            seen.append(page.resume["n"])
    assert seen == [0, 1, 2, 3, 4]


async def test_the_feed_barrier_waits_for_the_writer() -> None:
    order: list[str] = []

    def pages(barrier: Callable[[], Awaitable[None]]) -> AsyncIterator[Page]:
        async def gen() -> AsyncIterator[Page]:
            yield Page(resume={"n": 1})
            await barrier()
            order.append("after barrier")
            yield Page(resume={"n": 2}, done=True)
        return gen()

    async with Feed(pages) as feed:
        await feed.next()
        await asyncio.sleep(0.05)
        order.append("page 1 written")
        assert await feed.next() is not None
    assert order == ["page 1 written", "after barrier"]


async def test_the_feed_hands_on_the_listers_error() -> None:
    def pages(barrier: Callable[[], Awaitable[None]]) -> AsyncIterator[Page]:
        async def gen() -> AsyncIterator[Page]:
            yield Page()
            raise RuntimeError("provider broke")
        return gen()

    async with Feed(pages) as feed:
        await feed.next()
        with pytest.raises(RuntimeError, match="provider broke"):
            await feed.next()
