"""The admin queue API over HTTP: auth, validation, actions, audit, and the OpenAPI document."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from mwapjobs.daemon import Daemon
from mwapjobs.queues import Job, PermanentError
from mwapjobs.storage.mongo import Mongo
from tests.conftest import make_settings, wait_for

TOKEN = "mwj_test-admin-token-0123456789"


@pytest.fixture
async def daemon(mongo: Mongo) -> AsyncIterator[Daemon]:
    settings = make_settings(admin={"tokens": [
        {"name": "ops", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}]})
    d = Daemon(settings, mongo=mongo)
    calls: dict[str, int] = {}

    async def handler(job: Job) -> str:
        calls[job.data.get("n", "")] = calls.get(job.data.get("n", ""), 0) + 1
        if job.data.get("fail") and calls[job.data["n"]] == 1:
            raise PermanentError("refused by the provider")
        return "done"

    d.registry.register("token-refresh-demo", handler, attempts=1)
    await d.start()
    await d.wait_ready()
    yield d
    await d.stop()


async def call(d: Daemon, method: str, path: str, token: str | None = TOKEN,
               **kwargs: Any) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http, http.request(
            method, f"http://127.0.0.1:{d.port}{path}", headers=headers, **kwargs) as r:
        return r.status, await r.json()


async def test_every_admin_route_needs_credentials(daemon: Daemon) -> None:
    doc = (await call(daemon, "GET", "/api/v1/openapi.json", token=None))[1]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if op.get("security") == [] or {} in op.get("security", []):
                continue  # public, or access decided by configuration (/metrics)
            concrete = (path.replace("{queue}", "token-refresh-demo")
                        .replace("{runId}", "0" * 24).replace("{tenantId}", "t1")
                        .replace("{integrationId}", "i1").replace("{projectId}", "p1")
                        .replace("{jobId}", "tick"))
            assert "{" not in concrete, f"a path parameter this test does not fill: {path}"
            status, body = await call(daemon, method.upper(), concrete, token=None)
            assert status == 401, (method, path, body)
            assert body["error"]["code"] == "auth/unauthorized"
            status, _ = await call(daemon, method.upper(), concrete, token="wrong-token")
            assert status == 401, (method, path)


async def test_stats_in_the_seeds_shape(daemon: Daemon) -> None:
    await daemon.engine.add("token-refresh-demo", {"n": "a"})
    await daemon.engine.add("token-refresh-demo", {"n": "b"}, delay=3600)
    await wait_for(lambda: _completed(daemon, 1), message="one completed")
    status, body = await call(daemon, "GET", "/api/v1/queues/stats")
    assert status == 200
    counts = body["data"]["tokenRefreshDemo"]
    assert counts["completed"] == 1
    assert counts["delayed"] == 1
    assert {"waiting", "active", "completed", "failed", "delayed", "paused"} <= counts.keys()


async def _completed(d: Daemon, n: int) -> bool:
    return bool((await d.operations.stats())["token-refresh-demo"]["completed"] >= n)


async def test_retry_a_failed_run_and_audit_it(daemon: Daemon,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    added = await daemon.engine.add("token-refresh-demo", {"n": "x", "fail": True,
                                                           "accessToken": "ya29.secret"})
    await wait_for(lambda: _state(daemon, added.run_id, "failed"), message="failed")
    status, body = await call(daemon, "GET", "/api/v1/queues/token-refresh-demo/runs?state=failed")
    assert status == 200 and body["data"]["total"] == 1
    run = body["data"]["items"][0]
    assert run["data"]["accessToken"] == "[redacted]"
    assert run["error"]["permanent"] is True
    status, body = await call(daemon, "POST", f"/api/v1/queues/runs/{added.run_id}/retry")
    assert status == 200, body
    await wait_for(lambda: _state(daemon, added.run_id, "completed"), message="retried")
    status, body = await call(daemon, "POST", f"/api/v1/queues/runs/{added.run_id}/retry")
    assert status == 409 and body["error"]["code"] == "queue/conflict"


async def _state(d: Daemon, run_id: str, state: str) -> bool:
    return bool((await d.operations.get_run(run_id))["state"] == state)


async def test_audit_line_for_state_changes(daemon: Daemon,
                                            caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="mwapjobs.audit"):
        status, _ = await call(daemon, "POST", "/api/v1/queues/token-refresh-demo/pause")
        assert status == 200
    events = [r.audit_event for r in caplog.records if hasattr(r, "audit_event")]
    assert events and events[-1]["action"] == "queue.pause"
    assert events[-1]["actor"] == "token:ops"
    assert events[-1]["target"] == "queue:token-refresh-demo"
    assert events[-1]["level"] == "audit"
    assert TOKEN not in json.dumps(events)
    status, body = await call(daemon, "GET", "/api/v1/queues/stats")
    assert body["data"]["tokenRefreshDemo"]["isPaused"] is True
    await call(daemon, "POST", "/api/v1/queues/token-refresh-demo/resume")


@pytest.mark.parametrize(
    ("method", "path", "body", "message"),
    [
        ("GET", "/api/v1/queues/token-refresh-demo/runs?state=done", None, "state must be one"),
        ("GET", "/api/v1/queues/token-refresh-demo/runs?pageSize=0", None, "pageSize must be"),
        ("GET", "/api/v1/queues/token-refresh-demo/runs?pageSize=201", None, "pageSize must"),
        ("GET", "/api/v1/queues/token-refresh-demo/runs?page=x", None, "page must be an integer"),
        ("GET", "/api/v1/queues/runs/not-an-id", None, "runId must be 24 hexadecimal"),
        ("POST", "/api/v1/queues/token-refresh-demo/clean", {"state": "active"},
         "state must be completed or failed"),
        ("POST", "/api/v1/queues/token-refresh-demo/clean", {"olderThan": -1},
         "olderThan must be"),
        ("POST", "/api/v1/queues/token-refresh-demo/jobs", {"data": []}, "data must be"),
        ("POST", "/api/v1/queues/token-refresh-demo/jobs", {"delay": "soon"}, "delay must be"),
        ("POST", "/api/v1/queues/token-refresh-demo/jobs", {"bogus": 1}, "unknown field"),
        ("POST", "/api/v1/queues/token-refresh-demo/jobs", {"attempts": 0}, "attempts must"),
    ],
)
async def test_bad_parameters_are_400_with_a_clear_message(
    daemon: Daemon, method: str, path: str, body: dict[str, Any] | None, message: str,
) -> None:
    status, answer = await call(daemon, method, path, json=body)
    assert status == 400, answer
    assert message in answer["error"]["message"]


async def test_unknown_queue_and_run_are_404(daemon: Daemon) -> None:
    status, body = await call(daemon, "GET", "/api/v1/queues/nope/runs")
    assert status == 404 and body["error"]["code"] == "queue/not-found"
    status, body = await call(daemon, "GET", "/api/v1/queues/runs/" + "a" * 24)
    assert status == 404


async def test_add_promote_remove_clean(daemon: Daemon) -> None:
    status, body = await call(daemon, "POST", "/api/v1/queues/token-refresh-demo/jobs",
                              json={"data": {"n": "p"}, "delay": 3600, "jobId": "later"})
    assert status == 201 and body["data"]["state"] == "delayed"
    run_id = body["data"]["runId"]
    status, body = await call(daemon, "POST", "/api/v1/queues/token-refresh-demo/jobs",
                              json={"data": {"n": "p"}, "delay": 3600, "jobId": "later"})
    assert status == 200 and body["data"]["created"] is False
    status, body = await call(daemon, "POST", f"/api/v1/queues/runs/{run_id}/promote")
    assert status == 200
    await wait_for(lambda: _state(daemon, run_id, "completed"), message="promoted run done")
    status, body = await call(daemon, "POST", "/api/v1/queues/token-refresh-demo/clean",
                              json={"state": "completed", "olderThan": 0})
    assert status == 200 and body["data"]["deleted"] >= 1
    status, _ = await call(daemon, "DELETE", f"/api/v1/queues/runs/{run_id}")
    assert status == 404


async def test_openapi_documents_every_route() -> None:
    from mwapjobs.api.openapi import document

    daemon = Daemon(make_settings(), mongo=Mongo.from_clients(
        __import__("mongomock").MongoClient()))
    app = daemon.app()
    served = set()
    for resource in app.router.resources():
        info = resource.get_info()
        path = info.get("path") or info.get("formatter")
        if path is None:
            continue
        for route in resource:
            if route.method not in ("HEAD", "*"):
                served.add((route.method.lower(), path))
    from mwapjobs.api.keys import OPENAPI_PATHS

    documented = {(m, p) for p, ops in document(app[OPENAPI_PATHS])["paths"].items()
                  for m in ops}
    assert served - documented == set(), "routes missing from the OpenAPI document"
    assert documented - served == set(), "documented routes the app does not serve"
    assert daemon.http is not None
    await daemon.http.close()
    daemon.mongo.close()
