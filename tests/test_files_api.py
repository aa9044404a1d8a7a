"""File indexing as operators and tenants see it: the index endpoints (who may call them,
bad input answered 4xx in MWAP's envelope, one pass at a time), the sweep, the summary
panel's endpoint, metrics, the alert rule, `projects.metadata` only when allowed, and the
job switched off."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from mwapjobs.daemon import Daemon
from mwapjobs.jobs import DEFAULT_JOBS
from mwapjobs.jobs import files as files_job
from mwapjobs.jobs.files.rules import sync_failing
from mwapjobs.jobs.files.schedule import QUEUE
from mwapjobs.storage.files import FileIndexStore
from mwapjobs.storage.names import PROJECTS
from tests.conftest import make_mongo, make_settings, wait_for
from tests.support.files_world import ADMIN_TOKEN, KIND_TAGS, FilesWorld, Project, module_world
from tests.support.mwap_data import insert_tenant, utcnow

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def w() -> AsyncIterator[FilesWorld]:
    async with module_world(users=True, failure_alert_after=60) as world:
        yield world


def path(project: Project, tenant: str | None = None) -> str:
    return f"/api/v1/tenants/{tenant or project.tenant}/projects/{project.id}/index"


async def settle(w: FilesWorld, run_id: str) -> dict[str, Any]:
    run = await w.daemon.engine.wait_settled(run_id, 20)
    assert run is not None and run["state"] in ("completed", "failed"), run
    return run


async def test_the_owner_indexes_a_project_and_reads_its_summary(w: FilesWorld) -> None:
    tree = w.tree("dropbox")
    for n in range(4):
        tree.add(f"/Api/a{n}.txt", size=10)
    project = await w.project("dropbox", "/Api")

    status, body = await w.http("POST", path(project), token=w.user())
    assert status == 202 and body["success"] is True
    assert body["data"]["state"] == "waiting" and body["data"]["created"] is True
    run = await settle(w, body["data"]["runId"])
    assert run["data"]["trigger"] == "manual"
    assert run["data"]["requestedBy"] == "user:auth0|files-owner"

    status, body = await w.http("GET", path(project), token=w.user())
    assert status == 200
    view = body["data"]
    assert (view["state"], view["fileCount"], view["folderCount"], view["totalSize"]) == (
        "synced", 4, 0, 40)
    assert view["indexable"] is True and view["notIndexedBecause"] is None
    assert view["lastRun"]["mode"] == "full" and view["lastRun"]["added"] == 4
    assert view["provider"] == "dropbox" and view["lastSync"]
    answer = json.dumps(body)
    assert '"cursor"' not in answer and '"pass"' not in answer  # internal state stays in
    assert project.access_token not in answer

    status, body = await w.http("POST", path(project), {"full": True}, token=w.user())
    assert status == 202 and body["data"]["mode"] == "full"
    run = await settle(w, body["data"]["runId"])
    assert run["result"]["mode"] == "full"


async def test_who_may_call_and_what_bad_input_gets(w: FilesWorld) -> None:
    project = await w.project("dropbox", "/Api/Auth")
    other_tenant = await insert_tenant(w.mongo, "auth0|someone-else")
    stranger = w.user("auth0|stranger")
    cases: list[tuple[str, str, Any, str | None, int, str]] = [
        ("POST", path(project), None, None, 401, "auth/unauthorized"),
        ("POST", path(project), None, stranger, 403, "auth/forbidden"),
        ("GET", path(project), None, stranger, 403, "auth/forbidden"),
        ("GET", path(project, other_tenant), None, ADMIN_TOKEN, 404, "project/not-found"),
        ("POST", path(project, other_tenant), None, w.user(), 403, "auth/forbidden"),
        ("POST", f"/api/v1/tenants/{project.tenant}/projects/{'0' * 24}/index", None,
         ADMIN_TOKEN, 404, "project/not-found"),
        ("POST", f"/api/v1/tenants/{project.tenant}/projects/bad$id/index", None, ADMIN_TOKEN,
         400, "validation/invalid-id"),
        ("POST", path(project), {"full": "yes"}, ADMIN_TOKEN, 400, "validation/invalid-body"),
        ("POST", path(project), {"full": True, "extra": 1}, w.user(), 400,
         "validation/invalid-body"),
        ("POST", path(project), [1, 2], ADMIN_TOKEN, 400, "validation/invalid-json"),
        ("GET", "/api/v1/files/index?pageSize=0", None, ADMIN_TOKEN, 400,
         "validation/invalid-parameter"),
        ("GET", "/api/v1/files/index", None, w.user(), 403, "auth/forbidden"),
    ]
    for method, url, body, token, status, code in cases:
        got, answer = await w.http(method, url, body, token=token)
        assert (got, answer["success"], answer["error"]["code"]) == (status, False, code), \
            (method, url, answer)


async def test_a_project_that_is_not_indexed_says_why(w: FilesWorld) -> None:
    archived = await w.project("google", "/Api/Archived", archived=True)
    revoked = await w.project("google", "/Api/Revoked", status="revoked")
    for project, reason in ((archived, "archived"), (revoked, "revoked")):
        status, body = await w.http("POST", path(project))
        assert status == 409 and body["error"]["code"] == "files/not-indexable"
        assert reason in body["error"]["message"]
        status, body = await w.http("GET", path(project))
        assert status == 200 and body["data"]["indexable"] is False
        assert reason in body["data"]["notIndexedBecause"]


async def test_one_pass_at_a_time_per_project(w: FilesWorld) -> None:
    w.tree("microsoft").add("/Api/Busy/a.txt")
    project = await w.project("microsoft", "/Api/Busy")
    tag = KIND_TAGS["microsoft"]
    w.sim.hold(tag)
    try:
        status, first = await w.http("POST", path(project))
        assert status == 202
        await wait_for(lambda: project.id in w.indexer.running, message="the pass running")
        status, body = await w.http("POST", path(project))
        assert status == 409 and body["error"]["code"] == "files/index-running"
        assert first["data"]["runId"] in body["error"]["message"]
        status, body = await w.http("GET", path(project))
        assert body["data"]["running"]["runId"] == first["data"]["runId"]
    finally:
        w.sim.release(tag)
    run = await settle(w, first["data"]["runId"])
    assert run["state"] == "completed" and run["result"]["added"] == 1


async def test_the_sweep_adds_a_pass_per_project_and_forgets_archived_ones(
        w: FilesWorld) -> None:
    w.tree("google").add("/Sweep/a.txt")
    kept = await w.project("google", "/Sweep")
    result = (await w.index(kept))["result"]
    assert result["added"] == 1
    w.tree("google").add("/Sweep/b.txt")
    await w.mongo.call(lambda db: db[PROJECTS].update_one(
        {"_id": kept.stored_id}, {"$set": {"archived": True}}))
    gone_files = len(await w.files(kept))
    other = await w.project("google", "/Sweep2")
    w.tree("google").add("/Sweep2/c.txt")

    added = await w.daemon.engine.add(QUEUE, {"sweep": True, "spread": False}, job_id="sweep")
    sweep = await settle(w, added.run_id)

    assert sweep["result"]["dropped"] >= 1 and sweep["result"]["scheduled"] >= 1
    assert gone_files == 1 and await w.files(kept) == {}  # archived: its index is removed
    await wait_for(lambda: _synced(w, other), message="the sweep's pass of a project")
    assert set(await w.files(other)) == {"/Sweep2/c.txt"}


async def _synced(w: FilesWorld, project: Project) -> bool:
    doc = await FileIndexStore(w.mongo).state(project.id)
    return bool(doc and doc.get("state") == "synced")


async def test_the_summary_panel_metrics_and_openapi(w: FilesWorld) -> None:
    w.tree("dropbox").add("/Panel/a.txt", size=5)
    project = await w.project("dropbox", "/Panel")
    await w.index(project)

    status, body = await w.http("GET", "/api/v1/files/index?page=1&pageSize=200")
    assert status == 200 and body["data"]["enabled"] is True
    row = next(r for r in body["data"]["items"] if r["projectId"] == project.id)
    assert (row["state"], row["fileCount"], row["totalSize"]) == ("synced", 1, 5)
    assert body["data"]["byState"]["synced"] >= 1

    status, text = await _get_text(w, "/metrics")
    assert status == 200
    assert _metric(text, 'mwapjobs_files_indexed_total{change="added"}') >= 1
    assert _metric(text, 'mwapjobs_file_provider_calls_total{outcome="ok",provider="dropbox"}') >= 1
    assert _metric(text, 'mwapjobs_file_index_projects{state="synced"}') >= 1

    status, body = await w.http("GET", "/api/v1/openapi.json", token=None)
    paths = body["paths"] if "paths" in body else body["data"]["paths"]
    assert {"/api/v1/tenants/{tenantId}/projects/{projectId}/index",
            "/api/v1/files/index"} <= set(paths)


async def _get_text(w: FilesWorld, url: str) -> tuple[int, str]:
    import aiohttp

    async with aiohttp.ClientSession() as http, \
            http.get(f"http://127.0.0.1:{w.daemon.port}{url}") as resp:
        return resp.status, await resp.text()


def _metric(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} not in /metrics")


async def test_the_alert_fires_for_a_project_failing_longer_than_the_threshold(
        w: FilesWorld) -> None:
    store = FileIndexStore(w.mongo)
    rule = sync_failing(store, w.daemon.settings.files)  # files.failure_alert_after: 60 s
    now = utcnow()
    earlier = await store.count_failing_since(now + timedelta(minutes=5))
    project = await w.project("microsoft", "/Api/NoSuchFolder")
    run = await w.index(project)
    assert run["state"] == "failed"

    assert all(project.id not in c.details for c in await rule.check(_at(now)))  # not yet
    later = await rule.check(_at(now + timedelta(minutes=5)))
    assert len(later) == 1 and later[0].rule == "file_sync_failing"
    assert f"{earlier + 1} project(s) have failed to sync for more than 1m" in later[0].details
    assert "no folder /Api/NoSuchFolder" in later[0].details

    w.tree("microsoft").add("/Api/NoSuchFolder/now.txt")  # fixed: no longer counted
    assert (await w.index(project))["state"] == "completed"
    assert await store.count_failing_since(now + timedelta(minutes=5)) == earlier
    assert (await w.summary(project)).get("failingSince") is None


def _at(now: datetime) -> Any:
    return SimpleNamespace(now=now)  # what the rule reads of a RuleContext


async def test_project_metadata_is_written_only_when_allowed(w: FilesWorld) -> None:
    w.tree("google").add("/Meta/a.txt", size=3)
    project = await w.project("google", "/Meta")
    await w.index(project)
    doc = await w.mongo.call(lambda db: db[PROJECTS].find_one({"_id": project.stored_id}))
    assert "metadata" not in doc  # off by default: the backend's document is left alone

    settings = w.indexer.settings
    settings.write_project_metadata = True
    try:
        await w.index(project, "full")
    finally:
        settings.write_project_metadata = False
    doc = await w.mongo.call(lambda db: db[PROJECTS].find_one({"_id": project.stored_id}))
    assert (doc["metadata"]["fileCount"], doc["metadata"]["totalSize"]) == (1, 3)
    assert doc["metadata"]["lastSync"] is not None
    assert doc["updatedAt"] < doc["metadata"]["lastSync"]  # the project's own date stays


async def test_switched_off_it_answers_503_and_indexes_nothing() -> None:
    mongo, drop = make_mongo()
    settings = make_settings(refresh={"enabled": False}, health={"enabled": False},
                             files={"enabled": False},
                             admin={"tokens": [{"name": "ops", "sha256": hashlib.sha256(
                                 ADMIN_TOKEN.encode()).hexdigest()}]})
    assert files_job.PLUGIN in DEFAULT_JOBS  # plugged in, switched off by its setting
    daemon = Daemon(settings, mongo=mongo, jobs=DEFAULT_JOBS)
    try:
        tenant = await insert_tenant(mongo, "auth0|x")
        project = {"_id": "a" * 24, "tenantId": tenant, "cloudIntegrationId": "b" * 24,
                   "folderpath": "/", "archived": False}
        await mongo.call(lambda db: db[PROJECTS].insert_one(project))
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with TestClient(TestServer(daemon.app())) as client:
            assert daemon.jobs["files"] is None and QUEUE not in daemon.registry
            url = f"/api/v1/tenants/{tenant}/projects/{'a' * 24}/index"
            resp = await client.post(url, headers=admin)
            assert resp.status == 503
            assert (await resp.json())["error"]["code"] == "files/disabled"
            resp = await client.get(url, headers=admin)
            body = await resp.json()
            assert resp.status == 200 and body["data"]["enabled"] is False
            assert body["data"]["state"] == "never"
    finally:
        await daemon.stop()
        await mongo.aclose()
        drop()
