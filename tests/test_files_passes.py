"""File index passes against the Dropbox, Drive and Graph simulators
(tests/support/file_providers.py), through the daemon's `file-index` queue: the first
pass, incremental passes with adds, changes, deletions and moves, expired cursors, rate
limits, a stale token refreshed through Authlib's token endpoint, an ambiguous Drive
path, a revoked integration, both id forms.

One daemon for the module (a real server makes each start cost seconds); each test
works in folders of its own, pages hold 3 items.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from mwapjobs.storage.names import INTEGRATIONS
from tests.support.file_providers import Fault, rate_limited
from tests.support.file_tree import Tree
from tests.support.files_world import KIND_TAGS, FilesWorld, module_world
from tests.support.mwap_data import test_cipher

pytestmark = pytest.mark.asyncio(loop_scope="module")
KINDS = ["dropbox", "google", "microsoft"]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def w() -> AsyncIterator[FilesWorld]:
    async with module_world() as world:
        yield world


def expected(tree: Tree, folder: str) -> set[str]:
    """What the index of `folder` must hold: every path below it."""
    base = tree.get(folder)
    return {tree.path(item.id) for item in tree.below(base.id)}


def result(run: dict[str, Any]) -> dict[str, Any]:
    assert run["state"] == "completed", (run.get("error"), run.get("attempts"))
    out: dict[str, Any] = run["result"]
    return out


CHECKSUMS = {"dropbox": lambda item: item.digest, "google": lambda item: item.digest[:32],
             "microsoft": lambda item: item.digest[:27]}


@pytest.mark.parametrize("kind", KINDS)
async def test_a_first_pass_indexes_every_item_in_the_planned_schema(w: FilesWorld,
                                                                     kind: str) -> None:
    tree, folder = w.tree(kind), f"/First/{kind}"
    for n in range(5):
        tree.add(f"{folder}/f{n}.pdf", size=100 + n)
    shared = tree.add(f"{folder}/Sub/Deep/shared.pdf", size=7, shared=True)
    tree.add(f"/First/elsewhere-{kind}.pdf")
    # Dropbox and Graph projects as older documents hold them: ObjectId `_id`,
    # `tenantId`, `cloudIntegrationId` (and integration `_id`); compared as strings.
    project = await w.project(kind, folder, object_ids=kind != "google")

    report = result(await w.index(project))

    docs = await w.files(project)
    assert set(docs) == expected(tree, folder)
    assert (report["mode"], report["added"], report["files"], report["folders"]) == (
        "full", 8, 6, 2)
    assert report["pages"] >= 3 and report["totalSize"] == 100 + 101 + 102 + 103 + 104 + 7
    doc = docs[f"{folder}/Sub/Deep/shared.pdf"]
    assert doc["projectId"] == project.id and doc["integrationId"] == project.integration
    assert isinstance(doc["projectId"], str) and isinstance(doc["integrationId"], str)
    assert doc["providerId"] == str(w.providers[kind].id)
    assert doc["providerFileId"] in (shared.id, f"id:{shared.id}")
    assert (doc["name"], doc["type"], doc["size"]) == ("shared.pdf", "application/pdf", 7)
    assert doc["modifiedTime"] is not None and doc["createdAt"] and doc["updatedAt"]
    assert doc["metadata"]["checksum"] == CHECKSUMS[kind](shared)
    assert doc["metadata"]["permissions"], "sharing is reported"
    assert docs[f"{folder}/f0.pdf"]["metadata"]["permissions"] == []
    assert doc["syncStatus"]["status"] == "synced" and doc["syncStatus"]["lastSync"]
    assert docs[f"{folder}/Sub"]["type"] == "inode/directory"
    assert "download" not in repr(docs).lower()  # no short-lived URL is kept
    summary = await w.summary(project)
    assert (summary["state"], summary["fileCount"], summary["folderCount"]) == ("synced", 6, 2)
    assert summary["totalSize"] == report["totalSize"] and summary["lastFullSync"]


@pytest.mark.parametrize("kind", KINDS)
async def test_incremental_passes_follow_adds_changes_deletions_and_moves(
        w: FilesWorld, kind: str) -> None:
    tree, folder = w.tree(kind), f"/Inc/{kind}"
    for n in range(4):
        tree.add(f"{folder}/f{n}.txt", size=10)
    tree.add(f"{folder}/Album/a.jpg", size=5)
    tree.add(f"{folder}/Album/Inner/b.jpg", size=5)
    tree.add(f"{folder}/Trash/t.txt", size=5)
    tree.add(f"/Inc/outside-{kind}/Incoming/c.txt", size=3)
    project = await w.project(kind, folder)
    result(await w.index(project))
    moved = (await w.files(project))[f"{folder}/f3.txt"]

    tree.add(f"{folder}/new.txt", size=1)
    tree.modify(f"{folder}/f1.txt", size=99)
    tree.delete(f"{folder}/f2.txt")
    tree.move(f"{folder}/f3.txt", f"{folder}/Album/f3.txt")
    tree.move(f"{folder}/Album", f"{folder}/Photos")  # its descendants move with it
    tree.delete(f"{folder}/Trash")
    tree.move(f"/Inc/outside-{kind}/Incoming", f"{folder}/Incoming")  # comes with contents
    tree.move(f"{folder}/f0.txt", f"/Inc/outside-{kind}/f0.txt")  # leaves the project
    tree.add(f"/Inc/outside-{kind}/noise.txt")

    report = result(await w.index(project))

    docs = await w.files(project)
    assert set(docs) == expected(tree, folder)
    assert report["mode"] == "incremental" and report["removed"] >= 4
    assert docs[f"{folder}/f1.txt"]["size"] == 99
    assert docs[f"{folder}/Photos/f3.txt"]["_id"] == moved["_id"]  # the same document moved
    assert f"{folder}/Photos/Inner/b.jpg" in docs and f"{folder}/Incoming/c.txt" in docs
    summary = await w.summary(project)
    sizes = sum(int(d["size"] or 0) for d in docs.values() if d["type"] != "inode/directory")
    assert summary["fileCount"] == sum(d["type"] != "inode/directory" for d in docs.values())
    assert summary["totalSize"] == sizes

    before = w.sim.count(KIND_TAGS[kind])
    quiet = result(await w.index(project))
    assert (quiet["mode"], quiet["requests"], quiet["added"] + quiet["changed"]) == (
        "incremental", 1, 0)
    assert w.sim.count(KIND_TAGS[kind]) - before == 1  # one request when nothing changed


@pytest.mark.parametrize("kind", KINDS)
async def test_an_expired_cursor_makes_a_full_pass_that_removes_what_is_gone(
        w: FilesWorld, kind: str) -> None:
    tree, folder = w.tree(kind), f"/Expiry/{kind}"
    for n in range(4):
        tree.add(f"{folder}/f{n}.txt")
    project = await w.project(kind, folder)
    result(await w.index(project))
    tree.delete(f"{folder}/f0.txt")
    tree.add(f"{folder}/f9.txt")
    tree.expire()  # Dropbox `reset`, Graph 410, an unknown Drive page token

    report = result(await w.index(project))

    assert (report["cursorExpired"], report["mode"]) == (True, "full")
    assert set(await w.files(project)) == expected(tree, folder)
    assert report["removed"] == 1 and report["added"] == 1
    again = result(await w.index(project))  # the new cursor works
    assert (again["mode"], again["requests"]) == ("incremental", 1)


@pytest.mark.parametrize("kind", KINDS)
async def test_rate_limits_are_waited_out(w: FilesWorld, kind: str) -> None:
    tree, folder = w.tree(kind), f"/Rate/{kind}"
    tree.add(f"{folder}/a.txt")
    project = await w.project(kind, folder)
    w.sim.fail(KIND_TAGS[kind], rate_limited(kind, 0.3), rate_limited(kind, 0.3))
    start = len(w.sim.requests)
    started = time.monotonic()

    report = result(await w.index(project))

    assert time.monotonic() - started >= 0.6  # Retry-After (Drive: its own backoff)
    assert set(await w.files(project)) == expected(tree, folder)
    assert len(w.sim.requests) - start == report["requests"]
    limited = [r for r in w.sim.requests[start:] if r.status in (403, 429)]
    assert len(limited) == 2


@pytest.mark.parametrize("kind", KINDS)
async def test_a_stale_token_is_refreshed_once_and_the_request_sent_again(
        w: FilesWorld, kind: str) -> None:
    tree, folder = w.tree(kind), f"/Stale/{kind}"
    tree.add(f"{folder}/a.txt")
    project = await w.project(kind, folder)
    w.sim.stale(project.access_token)
    token_requests = len(w.oauth.requests)

    report = result(await w.index(project))

    assert set(await w.files(project)) == expected(tree, folder)
    assert len(w.oauth.requests) - token_requests == 1  # one refresh, by the refresh job
    stored = await w.mongo.call(lambda db: db[INTEGRATIONS].find_one(
        {"_id": project.integration}))
    fresh = test_cipher().decrypt(stored["accessToken"])
    assert fresh != project.access_token
    mine = [r for r in w.sim.requests if r.token in (project.access_token, fresh)]
    assert [r.status for r in mine if r.token == project.access_token] == [401]
    assert all(r.status == 200 for r in mine if r.token == fresh)
    assert report["requests"] == len(mine)


async def test_a_graph_delta_that_does_not_start_with_its_folder(w: FilesWorld) -> None:
    tree = w.tree("microsoft")
    tree.add("/NoRoot/Sub/a.txt")
    project = await w.project("microsoft", "/NoRoot")
    w.sim.graph_folder_first = False
    try:
        report = result(await w.index(project))
    finally:
        w.sim.graph_folder_first = True
    assert set(await w.files(project)) == expected(tree, "/NoRoot")
    assert report["requests"] == 2  # the folder is read for its id: one request more


async def test_a_refused_refresh_fails_the_project_for_good(w: FilesWorld) -> None:
    tree, folder = w.tree("dropbox"), "/Refused"
    tree.add(f"{folder}/a.txt")
    project = await w.project("dropbox", folder)
    stored = await w.mongo.call(lambda db: db[INTEGRATIONS].find_one(
        {"_id": project.integration}))
    w.oauth.revoke(test_cipher().decrypt(stored["refreshToken"]))
    w.sim.stale(project.access_token)

    run = await w.index(project)

    assert run["state"] == "failed" and run["error"]["permanent"]
    assert "refused" in run["error"]["message"]
    assert project.access_token not in repr(run)
    summary = await w.summary(project)
    assert summary["state"] == "error" and summary["lastError"]["code"] == "auth/refresh-refused"
    assert summary["failingSince"] is not None


async def test_an_ambiguous_drive_path_is_the_projects_error_not_a_guess(
        w: FilesWorld) -> None:
    tree = w.tree("google")
    tree.add("/Amb/Twin/Sub/a.txt")
    tree.mkdir("/Amb/Twin", duplicate=True)  # Drive allows two folders of one name
    ambiguous = await w.project("google", "/Amb/Twin/Sub")
    healthy = await w.project("google", "/Amb")  # its neighbour is indexed all the same

    run = await w.index(ambiguous)

    assert run["state"] == "failed" and run["error"]["permanent"]
    assert "2 folders are named 'Twin' in /Amb" in run["error"]["message"]
    summary = await w.summary(ambiguous)
    assert summary["lastError"]["code"] == "files/folder-ambiguous"
    assert await w.files(ambiguous) == {}
    result(await w.index(healthy))
    assert set(await w.files(healthy)) == expected(tree, "/Amb")


@pytest.mark.parametrize("kind", KINDS)
async def test_a_missing_folder_is_the_projects_error(w: FilesWorld, kind: str) -> None:
    project = await w.project(kind, f"/Missing/{kind}/nowhere")
    run = await w.index(project)
    assert run["state"] == "failed" and run["error"]["permanent"]
    assert (await w.summary(project))["lastError"]["code"] == "files/folder-not-found"


async def test_a_revoked_integration_is_never_touched(w: FilesWorld) -> None:
    w.tree("microsoft").add("/Revoked/a.txt")
    project = await w.project("microsoft", "/Revoked", status="revoked")
    w.sim.stale(project.access_token)
    before_doc = await w.mongo.call(lambda db: db[INTEGRATIONS].find_one(
        {"_id": project.integration}))
    requests, token_requests = len(w.sim.requests), len(w.oauth.requests)

    run = await w.index(project)

    assert run["result"] == {"projectId": project.id, "skipped": "the integration is revoked"}
    assert len(w.sim.requests) == requests and len(w.oauth.requests) == token_requests
    after_doc = await w.mongo.call(lambda db: db[INTEGRATIONS].find_one(
        {"_id": project.integration}))
    assert after_doc == before_doc
    summary = await w.summary(project)
    assert (summary["state"], summary["skipReason"]) == ("skipped", "the integration is revoked")


async def test_nested_project_folders_share_no_document(w: FilesWorld) -> None:
    tree = w.tree("dropbox")
    tree.add("/Nest/top.txt")
    tree.add("/Nest/Inner/deep.txt")
    outer = await w.project("dropbox", "/Nest")
    inner = await w.project("dropbox", "/Nest/Inner", integration=outer.integration)
    result(await w.index(outer))

    report = result(await w.index(inner))

    assert report["conflicts"] == 1 and await w.files(inner) == {}
    assert "/Nest/Inner/deep.txt" in await w.files(outer)  # the first project keeps it


async def test_one_failing_provider_never_stops_the_others(w: FilesWorld) -> None:
    w.tree("dropbox").add("/Iso/a.txt")
    w.tree("microsoft").add("/Iso/b.txt")
    broken = await w.project("dropbox", "/Iso")
    fine = await w.project("microsoft", "/Iso")
    w.sim.fail(KIND_TAGS["dropbox"], Fault(403, {"error_summary": "no_permission/.."}))

    failed, done = await w.index(broken), await w.index(fine)

    assert failed["state"] == "failed" and "HTTP 403" in failed["error"]["message"]
    assert result(done)["added"] == 1
    assert (await w.summary(broken))["state"] == "error"
    assert (await w.summary(fine))["state"] == "synced"
