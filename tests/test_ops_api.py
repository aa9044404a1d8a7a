"""The operators' API of issue 15 §3: read-only tokens, finding runs, bulk actions.

Each runs on both lanes; index use is checked with `explain` where the server has a
planner (the wire lane).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest

from mwapjobs.cli import main
from mwapjobs.daemon import Daemon
from mwapjobs.queues import Job, PermanentError, TransientError
from mwapjobs.storage.mongo import Mongo
from mwapjobs.storage.names import RUNS, THROUGHPUT
from mwapjobs.storage.runs import RunSearch
from tests.conftest import REAL_MONGODB_URI, make_settings, wait_for

ADMIN = "mwj_ops-api-admin-token-0123456789"
VIEWER = "mwj_ops-api-viewer-token-0123456789"
Q = "reports"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class Reports:
    """Fails for good on `fail` data (with error type `kind`), while `failing` is set."""

    def __init__(self) -> None:
        self.failing = True

    async def __call__(self, job: Job) -> str:
        if job.data.get("fail") and self.failing:
            if job.data.get("kind") == "transient":
                raise TransientError("the provider is slow")
            raise PermanentError(f"report {job.data.get('n')} refused")
        return "ok"


@pytest.fixture
async def daemon(mongo: Mongo) -> AsyncIterator[Daemon]:
    settings = make_settings(admin={"tokens": [
        {"name": "ops", "sha256": sha(ADMIN)},
        {"name": "watcher", "sha256": sha(VIEWER), "role": "viewer"}], "cookie_secure": False})
    d = Daemon(settings, mongo=mongo)
    d.registry.register(Q, Reports(), attempts=1)
    await d.start()
    await d.wait_ready()
    yield d
    await d.stop()


async def call(d: Daemon, method: str, path: str, token: str | None = ADMIN,
               **kwargs: Any) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http, http.request(
            method, f"http://127.0.0.1:{d.port}{path}", headers=headers, **kwargs) as r:
        return r.status, await r.json()


async def settle(d: Daemon, *, completed: int = 0, failed: int = 0) -> None:
    async def done() -> bool:
        counts = (await d.operations.stats())[Q]
        return bool(counts["completed"] >= completed and counts["failed"] >= failed
                    and counts["waiting"] == 0 and counts["active"] == 0)

    await wait_for(done, message=f"{completed} completed and {failed} failed")


# -- read-only tokens -----------------------------------------------------------------------


async def test_a_viewer_reads_everything_and_changes_nothing(
        daemon: Daemon, caplog: pytest.LogCaptureFixture) -> None:
    added = await daemon.engine.add(Q, {"n": 1, "fail": True}, job_id="r-1")
    await settle(daemon, failed=1)
    status, body = await call(daemon, "GET", "/api/v1/queues/stats", token=VIEWER)
    assert status == 200 and body["data"]["reports"]["isPaused"] is False
    status, body = await call(daemon, "GET", f"/api/v1/queues/runs/{added.run_id}", token=VIEWER)
    assert status == 200 and body["data"]["state"] == "failed"

    doc = (await call(daemon, "GET", "/api/v1/openapi.json", token=None))[1]
    mutating = [(method, path) for path, ops in doc["paths"].items()
                for method, op in ops.items()
                if method not in ("get", "head", "options") and op.get("security") != []]
    assert len(mutating) >= 12  # the queue actions and every job's
    with caplog.at_level(logging.INFO, logger="mwapjobs.audit"):
        for method, path in mutating:
            concrete = (path.replace("{queue}", Q).replace("{runId}", added.run_id)
                        .replace("{tenantId}", "t1").replace("{integrationId}", "i1")
                        .replace("{projectId}", "p1").replace("{name}", "x")
                        .replace("{jobId}", "x"))
            status, body = await call(daemon, method.upper(), concrete, token=VIEWER,
                                      json={"state": "failed", "olderThan": 0})
            assert status == 403, (method, path, status, body)
            assert body["success"] is False and body["error"]["code"] == "auth/forbidden"
            assert "read-only" in body["error"]["message"]
    assert not [r for r in caplog.records if hasattr(r, "audit_event")]
    run = await daemon.operations.get_run(added.run_id)
    assert run["state"] == "failed"  # not retried, not removed
    assert (await daemon.operations.stats())[Q]["isPaused"] is False

    # The same calls with the admin token act, and the audit line says which role acted.
    with caplog.at_level(logging.INFO, logger="mwapjobs.audit"):
        status, _ = await call(daemon, "POST", f"/api/v1/queues/{Q}/pause")
        assert status == 200
    events = [r.audit_event for r in caplog.records if hasattr(r, "audit_event")]
    assert events[-1]["action"] == "queue.pause"
    assert events[-1]["actor"] == "token:ops" and events[-1]["role"] == "admin"


async def test_a_viewer_session_says_read_only_and_cannot_act_by_cookie(daemon: Daemon) -> None:
    base = f"http://127.0.0.1:{daemon.port}"
    async with aiohttp.ClientSession(base, cookie_jar=aiohttp.CookieJar(unsafe=True),
                                     headers={"Origin": base}) as http:
        async with http.post("/admin/login", data={"token": VIEWER},
                             allow_redirects=False) as r:
            assert r.status == 303
        async with http.get("/admin/session") as r:
            session = (await r.json())["data"]
        assert session["role"] == "viewer" and session["readOnly"] is True
        assert session["actor"] == "token:watcher"
        headers = {"X-CSRF-Token": session["csrfToken"]}
        async with http.post(f"/api/v1/queues/{Q}/pause", headers=headers) as r:
            assert r.status == 403
            assert (await r.json())["error"]["code"] == "auth/forbidden"
        async with http.post("/admin/logout", headers=headers) as r:
            assert r.status == 200  # logging out is not a change to the daemon
    assert (await daemon.operations.stats())[Q]["isPaused"] is False


def test_admin_token_viewer_prints_an_entry_with_the_role(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["admin-token", "dash-wall", "--viewer"]) == 0
    out = capsys.readouterr().out
    assert 'role = "viewer"' in out
    token = out.split("\n\n")[1].strip()
    env = json.loads(out.rsplit("MWAPJOBS_ADMIN__TOKENS='", 1)[1].rstrip().rstrip("'"))
    assert env == [{"name": "dash-wall", "sha256": sha(token), "role": "viewer"}]
    assert make_settings(admin={"tokens": env}).admin.tokens[0].role == "viewer"
    assert main(["admin-token", "ops"]) == 0
    assert "role" not in capsys.readouterr().out  # admin: the entry as before roles


def test_token_roles_default_to_admin_and_refuse_others() -> None:
    settings = make_settings(admin={"tokens": [{"name": "old", "sha256": sha("x")}]})
    assert settings.admin.tokens[0].role == "admin"
    with pytest.raises(ValueError, match="role"):
        make_settings(admin={"tokens": [{"name": "x", "sha256": sha("x"), "role": "root"}]})


# -- find a run ------------------------------------------------------------------------------


async def test_find_runs_by_job_id_across_states_newest_first(daemon: Daemon) -> None:
    failed = await daemon.engine.add(Q, {"n": 1, "fail": True, "integrationId": "int-7"},
                                     job_id="integration:int-7")
    await settle(daemon, failed=1)
    reports = daemon.registry.get(Q).handler
    assert isinstance(reports, Reports)
    reports.failing = False
    done = await daemon.engine.add(Q, {"n": 2, "integrationId": "int-7"},
                                   job_id="integration:int-7")
    await settle(daemon, completed=1, failed=1)
    later = await daemon.engine.add(Q, {"n": 3, "integrationId": "int-7"},
                                    job_id="integration:int-7", delay=3600)
    other = await daemon.engine.add(Q, {"n": 4, "integrationId": "int-8"},
                                    job_id="integration:int-8", delay=3600)

    status, body = await call(daemon, "GET", f"/api/v1/queues/{Q}/runs?jobId=integration:int-7")
    assert status == 200, body
    data = body["data"]
    assert data["total"] == 3
    assert [r["runId"] for r in data["items"]] == [later.run_id, done.run_id, failed.run_id]
    assert [r["state"] for r in data["items"]] == ["delayed", "completed", "failed"]

    # One state; a prefix; every queue; a data field; pages.
    status, body = await call(daemon, "GET",
                              f"/api/v1/queues/{Q}/runs?jobId=integration:int-7&state=failed")
    assert [r["runId"] for r in body["data"]["items"]] == [failed.run_id]
    status, body = await call(daemon, "GET", "/api/v1/queues/runs?jobId=integration:*")
    assert status == 200 and body["data"]["total"] == 4
    status, body = await call(daemon, "GET",
                              "/api/v1/queues/runs?field=integrationId&value=int-8")
    assert [r["runId"] for r in body["data"]["items"]] == [other.run_id]
    pages = []
    for page in (1, 2):
        status, body = await call(
            daemon, "GET", f"/api/v1/queues/runs?field=integrationId&value=int-7"
                           f"&page={page}&pageSize=2")
        assert body["data"]["total"] == 3
        pages.append([r["runId"] for r in body["data"]["items"]])
    assert pages == [[later.run_id, done.run_id], [failed.run_id]]
    # Without a search, the list is what it was: one state, failed by default.
    status, body = await call(daemon, "GET", f"/api/v1/queues/{Q}/runs")
    assert [r["runId"] for r in body["data"]["items"]] == [failed.run_id]


@pytest.mark.parametrize(("query", "message"), [
    ("field=$where&value=1", "field must be one of"),
    ("field=data.secret&value=1", "field must be one of"),
    ("field=attempts&value=1", "field must be one of"),
    ("field=integrationId", "field and value go together"),
    ("value=x", "field and value go together"),
    ("state=all", "state=all needs a search"),
    ("jobId=a*b", "at most one * at the end"),
    ("jobId=*", "jobId must be 1-200"),
    ("jobId=x&state=gone", "state must be one of"),
    ("jobId=x&$where=1", "unknown parameter"),
    ("jobId=x&pageSize=500", "pageSize must be between"),
])
async def test_search_parameters_are_checked(daemon: Daemon, query: str, message: str) -> None:
    status, body = await call(daemon, "GET", f"/api/v1/queues/{Q}/runs?{query}")
    assert status == 400, body
    assert body["success"] is False and body["error"]["code"].startswith("validation/")
    assert message in body["error"]["message"]


async def test_finding_runs_needs_a_search_and_a_known_queue(daemon: Daemon) -> None:
    status, body = await call(daemon, "GET", "/api/v1/queues/runs")
    assert status == 400 and "jobId" in body["error"]["message"]
    status, body = await call(daemon, "GET", "/api/v1/queues/runs?queue=nope&jobId=x")
    assert status == 404 and body["error"]["code"] == "queue/not-found"


@pytest.mark.skipif(not REAL_MONGODB_URI, reason="index use needs a server with a planner "
                                                  "(mongomock scans); runs on the wire lane")
async def test_searches_walk_their_index_not_the_history(daemon: Daemon) -> None:
    for n in range(30):
        await daemon.engine.add(Q, {"n": n, "integrationId": f"int-{n % 3}"},
                                job_id=f"integration:int-{n}", delay=3600)
    cases = [(RunSearch(job_id="integration:int-4"), "mwapjobs_job", 1),
             (RunSearch(job_id="integration:int-4", queue=Q, state="delayed"),
              "mwapjobs_job", 1),
             (RunSearch(job_id="integration:int-1", job_id_prefix=True), "mwapjobs_job", 11),
             (RunSearch(field="integrationId", value="int-1", queue=Q),
              "mwapjobs_data_integrationId", 10)]
    for search, index, found in cases:
        # The query `RunStore.search` makes, with its sort and index.
        plan = await daemon.mongo.call(lambda db, s=search: db[RUNS].find(s.query())
                                       .sort(s.order()).hint(s.index()).explain())
        text = str(plan["queryPlanner"]["winningPlan"])
        assert "IXSCAN" in text and index in text, plan
        stats = plan["executionStats"]
        assert stats["nReturned"] == found
        assert stats["totalDocsExamined"] == found, stats  # no run outside the answer read


# -- bulk actions ---------------------------------------------------------------------------


async def test_retry_all_failed_counts_first_then_retries_what_was_counted(
        daemon: Daemon, caplog: pytest.LogCaptureFixture) -> None:
    for n in range(5):
        await daemon.engine.add(Q, {"n": n, "fail": True}, job_id=f"p-{n}")
    await daemon.engine.add(Q, {"n": 9, "fail": True})  # no job id
    await settle(daemon, failed=6)
    status, body = await call(daemon, "POST", f"/api/v1/queues/{Q}/retry-failed",
                              json={"dryRun": True})
    assert status == 200, body
    dry = body["data"]
    assert dry["count"] == 6 and dry["byErrorType"] == {"PermanentError": 6}
    status, body = await call(daemon, "POST", f"/api/v1/queues/{Q}/retry-failed",
                              json={"dryRun": True, "errorType": "Nope"})
    assert body["data"]["count"] == 0

    # A run that fails after the count is not in what the operator confirmed.
    late = await daemon.engine.add(Q, {"n": 10, "fail": True}, job_id="late")
    await settle(daemon, failed=7)
    # A failed run whose job id is pending again is skipped: no second pending run.
    pending = await daemon.engine.add(Q, {"n": 0}, job_id="p-0", delay=3600)
    reports = daemon.registry.get(Q).handler
    assert isinstance(reports, Reports)
    reports.failing = False
    with caplog.at_level(logging.INFO, logger="mwapjobs.audit"):
        status, body = await call(daemon, "POST", f"/api/v1/queues/{Q}/retry-failed",
                                  json={"asOf": dry["asOf"]})
    assert status == 200, body
    assert body["data"] == {"queue": Q, "errorType": None, "retried": 5, "skipped": 1,
                            "more": False}
    await settle(daemon, completed=5)

    async def counted() -> bool:
        # The finished counters follow within a second (engine.COUNT_FLUSH_SECONDS).
        counts = (await daemon.operations.stats())[Q]
        return bool(counts["failed"] == 2 and counts["completed"] == 5
                    and counts["delayed"] == 1)

    await wait_for(counted, message="2 failed, 5 completed, 1 delayed")
    assert (await daemon.operations.get_run(late.run_id))["state"] == "failed"
    assert (await daemon.operations.get_run(pending.run_id))["state"] == "delayed"
    event = [r.audit_event for r in caplog.records if hasattr(r, "audit_event")][-1]
    assert event["action"] == "queue.bulk.retry" and event["retried"] == 5
    assert event["role"] == "admin"


async def test_retry_failed_by_error_type(daemon: Daemon) -> None:
    await daemon.engine.add(Q, {"n": 1, "fail": True}, job_id="a")
    await daemon.engine.add(Q, {"n": 2, "fail": True, "kind": "transient"}, job_id="b",
                            attempts=1)
    await settle(daemon, failed=2)
    status, body = await call(daemon, "POST", f"/api/v1/queues/{Q}/retry-failed",
                              json={"dryRun": True})
    assert body["data"]["byErrorType"] == {"PermanentError": 1, "TransientError": 1}
    reports = daemon.registry.get(Q).handler
    assert isinstance(reports, Reports)
    reports.failing = False
    status, body = await call(daemon, "POST", f"/api/v1/queues/{Q}/retry-failed",
                              json={"errorType": "TransientError"})
    assert status == 200 and body["data"]["retried"] == 1
    await settle(daemon, completed=1)
    failed = await daemon.operations.list_runs(Q, "failed")
    assert [r["jobId"] for r in failed["items"]] == ["a"]


async def test_promote_all_delayed(daemon: Daemon) -> None:
    for n in range(4):
        await daemon.engine.add(Q, {"n": n}, job_id=f"d-{n}", delay=3600)
    status, body = await call(daemon, "POST", f"/api/v1/queues/{Q}/promote-delayed",
                              json={"dryRun": True})
    assert status == 200 and body["data"]["count"] == 4
    as_of = body["data"]["asOf"]
    assert datetime.fromisoformat(as_of).tzinfo is not None
    status, body = await call(daemon, "POST", f"/api/v1/queues/{Q}/promote-delayed",
                              json={"asOf": as_of})
    assert status == 200 and body["data"]["promoted"] == 4 and body["data"]["more"] is False
    await settle(daemon, completed=4)
    assert (await daemon.operations.stats())[Q]["delayed"] == 0


@pytest.mark.parametrize(("path", "body", "status", "message"), [
    ("retry-failed", {"dryRun": "yes"}, 400, "dryRun must be true or false"),
    ("retry-failed", {"errorType": 3}, 400, "errorType must be a string"),
    ("retry-failed", {"asOf": "yesterday"}, 400, "asOf must be an ISO 8601"),
    ("retry-failed", {"limit": 5}, 400, "unknown field"),
    ("promote-delayed", {"errorType": "x"}, 400, "unknown field"),
    ("promote-delayed", {"asOf": 5}, 400, "asOf must be an ISO 8601"),
])
async def test_bulk_bodies_are_checked(daemon: Daemon, path: str, body: dict[str, Any],
                                       status: int, message: str) -> None:
    got, answer = await call(daemon, "POST", f"/api/v1/queues/{Q}/{path}", json=body)
    assert got == status, answer
    assert answer["success"] is False and message in answer["error"]["message"]
    got, answer = await call(daemon, "POST", f"/api/v1/queues/nope/{path}", json={})
    assert got == 404 and answer["error"]["code"] == "queue/not-found"


# -- throughput ------------------------------------------------------------------------------


async def test_throughput_counts_finished_runs_per_minute(daemon: Daemon, mongo: Mongo) -> None:
    for n in range(3):
        await daemon.engine.add(Q, {"n": n})
    for n in range(2):
        await daemon.engine.add(Q, {"n": 10 + n, "fail": True})
    await settle(daemon, completed=3, failed=2)

    async def counted() -> bool:
        stored = await daemon.engine.runs.throughput(datetime.now(UTC) - timedelta(hours=1))
        totals = [c for by_queue in stored.values() for q, c in by_queue.items() if q == Q]
        return (sum(c["completed"] for c in totals), sum(c["failed"] for c in totals)) == (3, 2)

    await wait_for(counted, message="the per-minute counters written to MongoDB")
    status, body = await call(daemon, "GET", "/api/v1/queues/throughput", token=VIEWER)
    assert status == 200, body
    data = body["data"]
    assert data["minutes"] == 1440 and data["stepSeconds"] == 60
    series = data["queues"][Q]
    assert len(series["completed"]) == len(series["failed"]) == 1440
    assert series["total"] == {"completed": 3, "failed": 2}
    assert sum(series["completed"][-2:]) == 3 and sum(series["failed"][-2:]) == 2
    assert datetime.fromisoformat(data["to"]) - datetime.fromisoformat(data["from"]) == \
        timedelta(minutes=1439)
    # A retry or a clean takes runs out of the finished counts, not out of the minutes.
    await daemon.operations.clean(Q, "completed", 0)
    status, body = await call(daemon, "GET", f"/api/v1/queues/throughput?queue={Q}&minutes=5")
    assert body["data"]["queues"][Q]["total"] == {"completed": 3, "failed": 2}
    assert list(body["data"]["queues"]) == [Q]

    # Bounded: a TTL index on the minute, and older minutes pruned where TTL is missing.
    info = await mongo.call(lambda db: db[THROUGHPUT].index_information())
    ttl = info["mwapjobs_throughput_ttl"]
    assert ttl["key"] == [("minute", 1)] and ttl["expireAfterSeconds"] == 48 * 3600
    # (Within the 48 hours kept: older minutes the engine's own hourly prune may take.)
    old = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(hours=47)
    await daemon.engine.runs.bump_minutes({(old, Q, "completed"): 7})
    assert await daemon.engine.runs.prune_throughput(old + timedelta(minutes=1)) == 1
    assert old not in await daemon.engine.runs.throughput(old - timedelta(minutes=1))


@pytest.mark.parametrize(("query", "status"), [
    ("minutes=0", 400), ("minutes=1441", 400), ("minutes=x", 400), ("queue=nope", 404)])
async def test_throughput_parameters_are_checked(daemon: Daemon, query: str,
                                                 status: int) -> None:
    got, body = await call(daemon, "GET", f"/api/v1/queues/throughput?{query}")
    assert got == status and body["success"] is False


# -- schedules ------------------------------------------------------------------------------


async def test_run_a_repeat_now_and_see_its_last_run(daemon: Daemon) -> None:
    await daemon.engine.repeat(Q, {"n": 42}, cron="0 3 * * *", job_id="nightly")
    status, body = await call(daemon, "GET", f"/api/v1/queues/repeats?queue={Q}")
    [repeat] = body["data"]
    assert repeat["paused"] is False and repeat["lastRun"] is None
    next_fire = repeat["nextRunAt"]
    status, body = await call(daemon, "POST", f"/api/v1/queues/repeats/{Q}/nightly/run")
    assert status == 202 and body["data"]["created"] is True
    run_id = body["data"]["runId"]
    await wait_for(lambda: _state(daemon, run_id, "completed"), message="the run by hand")
    status, body = await call(daemon, "GET", f"/api/v1/queues/repeats?queue={Q}")
    [repeat] = body["data"]
    assert repeat["lastRun"]["runId"] == run_id and repeat["lastRun"]["state"] == "completed"
    assert repeat["lastRun"]["fired"] is False
    assert repeat["nextRunAt"] == next_fire  # its schedule did not move
    run = await daemon.operations.get_run(run_id)
    assert run["data"] == {"n": 42} and run["jobId"] == "nightly"
    status, body = await call(daemon, "POST", f"/api/v1/queues/repeats/{Q}/other/run")
    assert status == 404 and body["error"]["code"] == "queue/not-found"


async def _state(d: Daemon, run_id: str, state: str) -> bool:
    return bool((await d.operations.get_run(run_id))["state"] == state)


async def test_a_paused_repeat_does_not_fire_and_stays_paused(daemon: Daemon,
                                                              mongo: Mongo) -> None:
    await daemon.engine.repeat(Q, {"n": 1}, every=1, job_id="tick")
    await wait_for(lambda: _runs_of(daemon, "tick", 1), message="a first fire")
    status, body = await call(daemon, "POST", f"/api/v1/queues/repeats/{Q}/tick/pause")
    assert status == 200 and body["data"]["paused"] is True
    assert body["data"]["nextRunAt"] is None
    # Every instance sees it: the pause is in the shared job store.
    other = Daemon(make_settings(), mongo=mongo)
    other.registry.register(Q, Reports(), attempts=1)
    await other.engine.scheduler.start()
    try:
        [seen] = await other.engine.scheduler.repeats(Q)
        assert seen.paused
    finally:
        await other.engine.scheduler.shutdown()
        other.engine.scheduler.close()
    fired = len((await daemon.operations.search(RunSearch(job_id="tick")))["items"])
    # Declaring the repeat again (every start does) keeps it paused, even with new data.
    await daemon.engine.repeat(Q, {"n": 2}, every=1, job_id="tick")
    [repeat] = await daemon.operations.repeats(Q)
    assert repeat["paused"] is True and repeat["data"] == {"n": 2}
    # The clock, made to look twice (a second apart: the interval), fires nothing.
    clock = daemon.engine.scheduler._clock
    assert clock is not None
    for _ in range(2):
        passes = clock.passes
        started = asyncio.get_running_loop().time()
        clock.wakeup()
        await wait_for(lambda p=passes: clock.passes > p, message="a clock pass")
        await wait_for(lambda t=started: asyncio.get_running_loop().time() - t > 1.0,
                       message="the interval to pass")
    assert len((await daemon.operations.search(RunSearch(job_id="tick")))["items"]) == fired
    status, body = await call(daemon, "POST", f"/api/v1/queues/repeats/{Q}/tick/resume")
    assert status == 200 and body["data"]["paused"] is False and body["data"]["nextRunAt"]
    await wait_for(lambda: _runs_of(daemon, "tick", fired + 1), message="fires again")


async def _runs_of(d: Daemon, job_id: str, n: int) -> bool:
    found = await d.operations.search(RunSearch(job_id=job_id), page_size=200)
    return bool(found["total"] >= n)


async def test_a_viewer_cannot_run_or_pause_a_repeat(daemon: Daemon) -> None:
    await daemon.engine.repeat(Q, {"n": 1}, cron="0 3 * * *", job_id="nightly")
    for action in ("run", "pause", "resume"):
        status, body = await call(daemon, "POST", f"/api/v1/queues/repeats/{Q}/nightly/{action}",
                                  token=VIEWER)
        assert status == 403 and body["error"]["code"] == "auth/forbidden"
    [repeat] = await daemon.operations.repeats(Q)
    assert repeat["paused"] is False and repeat["lastRun"] is None
