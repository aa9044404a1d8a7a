"""Upkeep (jobs/maintenance/) on a real daemon: expired OAuth flows reset as the backend
resets them, history archived to complete-or-absent files before it is deleted, the
backend's audit log only when it exists, the database report, the API and metrics."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from bson import ObjectId

from mwapjobs.daemon import Daemon
from mwapjobs.engine import Engine
from mwapjobs.jobs.maintenance.report import DatabaseReport
from mwapjobs.jobs.maintenance.upkeep import HEALTH_FOLDER, Budget, Upkeep
from mwapjobs.queues import QueueRegistry
from mwapjobs.storage.alert_history import AlertHistoryStore
from mwapjobs.storage.integrations import IntegrationStore
from mwapjobs.storage.maintenance import FLOW_FIELDS, MaintenanceStore
from mwapjobs.storage.mongo import Mongo
from mwapjobs.storage.names import (
    ALERT_HISTORY,
    INTEGRATION_STATE,
    INTEGRATIONS,
    NOTIFICATIONS,
    PROJECTS,
    PROVIDERS,
    RUNS,
    TENANTS,
)
from tests.conftest import make_settings, wait_for
from tests.support.admin import call, with_admin
from tests.support.mwap_data import insert_all, insert_integration, insert_tenant, new_hex_id

NOW = datetime.now(UTC)
OLD = NOW - timedelta(days=200)
MakeDaemon = Callable[..., Any]


@pytest.fixture
async def make_daemon(mongo: Mongo) -> AsyncIterator[MakeDaemon]:
    made: list[Daemon] = []

    async def make(queues: dict[str, Any] | None = None, **maintenance: Any) -> Daemon:
        settings = make_settings(**with_admin(
            refresh={"enabled": False}, health={"enabled": False},
            queues=queues or {}, maintenance=maintenance))
        daemon = Daemon(settings, mongo=mongo)
        if queues:
            async def report(job: Any) -> dict[str, int]:
                return {"n": int(job.data["n"])}
            daemon.registry.register("reports", report)
        await daemon.start()
        await daemon.wait_ready()
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        await daemon.stop()


@pytest.fixture
def make_upkeep(mongo: Mongo) -> Callable[..., Upkeep]:
    """Upkeep without a daemon (an engine that is not started: no queue of its own to
    trim), for the parts that need no runs: quicker, above all on the wire lane."""

    def make(**maintenance: Any) -> Upkeep:
        settings = make_settings(refresh={"enabled": False}, health={"enabled": False},
                                 maintenance=maintenance).maintenance
        engine = Engine(mongo, QueueRegistry())
        store = MaintenanceStore(mongo)
        own = [engine.runs.ensure_indexes, IntegrationStore(mongo).ensure_indexes,
               AlertHistoryStore(mongo).ensure_indexes, store.ensure_indexes]
        made = Upkeep(store, settings, engine, lambda: datetime.now(UTC),
                      DatabaseReport(store, settings, own))
        made.register(engine)
        return made

    return make


def budget() -> Budget:
    return Budget(60.0)


def upkeep(daemon: Daemon) -> Upkeep:
    handle = daemon.jobs["maintenance"]
    assert isinstance(handle, Upkeep)
    return handle


async def insert(mongo: Mongo, collection: str, docs: list[dict[str, Any]]) -> None:
    await insert_all(mongo, collection, docs)


async def ids(mongo: Mongo, collection: str, query: dict[str, Any] | None = None) -> set[Any]:
    docs = await mongo.call(lambda db: db[collection].find(query or {}, {"_id": 1})
                            .to_list(None))
    return {d["_id"] for d in docs}


def read_archive(path: Path) -> list[dict[str, Any]]:
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


# -- expired OAuth flows -------------------------------------------------------------------------


def flow(status: str, expires: datetime) -> dict[str, Any]:
    return {"flowId": new_hex_id(), "nonce": "n0nce", "stateHash": "sha256-of-state",
            "pkceVerifierEncrypted": "aXY=:dGFn:Y2lwaGVy", "status": status,
            "createdAt": expires - timedelta(minutes=10), "expiresAt": expires,
            "updatedAt": expires - timedelta(minutes=10)}


async def test_expired_flows_are_reset_as_the_backend_resets_them(
        make_upkeep: Callable[..., Upkeep], mongo: Mongo,
        caplog: pytest.LogCaptureFixture) -> None:
    now = datetime.now(UTC)  # not NOW (import time): the run may reach this minutes later
    past, future = now - timedelta(minutes=5), now + timedelta(minutes=5)
    seeded = {name: await insert_integration(mongo, None, provider=str(ObjectId()),
                                             tenant_id="t1", oauth=state,
                                             updated_at=OLD)
              for name, state in {"initiated": flow("initiated", past),
                                  "exchanging": flow("exchanging", past),
                                  "running": flow("initiated", future),
                                  "idle": {**flow("idle", past)},
                                  "done": {"status": "completed", "expiresAt": past}}.items()}
    caplog.set_level(logging.INFO, logger="mwapjobs.audit")
    flows = await make_upkeep().reset_flows(budget(), datetime.now(UTC))
    assert flows == {"enabled": True, "found": 2, "reset": 2, "changedMeanwhile": 0}
    for name in ("initiated", "exchanging"):
        doc = await mongo.call(lambda db, n=name: db[INTEGRATIONS].find_one({"_id": seeded[n]}))
        assert doc["oauth"]["status"] == "idle"
        assert set(doc["oauth"]) == {"status", "updatedAt"}  # every flow field unset
        assert doc["oauth"]["updatedAt"] >= NOW - timedelta(seconds=5)
        assert doc["updatedAt"] == doc["oauth"]["updatedAt"]
        assert doc["accessToken"] is not None  # nothing else changed
    for name in ("running", "idle", "done"):
        doc = await mongo.call(lambda db, n=name: db[INTEGRATIONS].find_one({"_id": seeded[n]}))
        assert doc["updatedAt"] < NOW - timedelta(days=1), name  # untouched
    audits = [r.audit_event for r in caplog.records if hasattr(r, "audit_event")]
    assert sorted(a["target"] for a in audits if a["action"] == "oauth.flow.reset-expired") == \
        sorted(f"integration:{seeded[n]}" for n in ("initiated", "exchanging"))
    assert all(a["actor"] == "mwapjobs:maintenance" for a in audits)
    assert not any(FLOW_FIELDS[3] in json.dumps(a, default=str) for a in audits)


async def test_a_flow_that_changed_meanwhile_is_left_alone(mongo: Mongo) -> None:
    store = MaintenanceStore(mongo)
    integration = await insert_integration(mongo, None, provider=str(ObjectId()),
                                           tenant_id="t1",
                                           oauth=flow("initiated", NOW - timedelta(minutes=1)))
    [read] = await store.expired_flows(NOW, 10)
    assert "pkceVerifierEncrypted" not in read["oauth"]  # never read, never logged
    fresh = flow("initiated", NOW + timedelta(minutes=10))  # the tenant started a new flow
    await mongo.call(lambda db: db[INTEGRATIONS].update_one({"_id": integration},
                                                            {"$set": {"oauth": fresh}}))
    assert await store.reset_flow(read, NOW) is False
    doc = await mongo.call(lambda db: db[INTEGRATIONS].find_one({"_id": integration}))
    assert doc["oauth"]["flowId"] == fresh["flowId"]
    assert doc["oauth"]["pkceVerifierEncrypted"] == fresh["pkceVerifierEncrypted"]


# -- history: archive, then delete -------------------------------------------------------------


async def seed_history(mongo: Mongo) -> dict[str, Any]:
    old_note = {"_id": new_hex_id(), "kind": "integration.expired", "tenantId": "t1",
                "integrationId": "i1", "createdAt": OLD, "delivered": True}
    undelivered = {**old_note, "_id": new_hex_id(), "delivered": False}
    recent = {**old_note, "_id": new_hex_id(), "createdAt": NOW}
    await insert(mongo, NOTIFICATIONS, [old_note, undelivered, recent])
    await insert(mongo, ALERT_HISTORY, [{"at": OLD, "status": "firing", "rule": "backlog"},
                                        {"at": NOW, "status": "resolved", "rule": "backlog"}])
    health = {"_id": "i1", "health": {"tenantId": "t1", "providerId": "p1", "history": [
        {"at": OLD, "outcome": "failing", "message": "HTTP 500"},
        {"at": NOW, "outcome": "healthy", "message": "HTTP 200"}]}}
    await insert(mongo, INTEGRATION_STATE, [health])
    return {"old": old_note["_id"], "undelivered": undelivered["_id"], "recent": recent["_id"]}


async def finished_reports(daemon: Daemon, n: int) -> None:
    for i in range(n):
        await daemon.engine.add("reports", {"n": i})

    async def done() -> bool:
        return (await daemon.operations.stats())["reports"]["completed"] == n

    await wait_for(done, message="the reports to complete")


async def test_history_is_archived_to_readable_files_then_deleted(
        make_daemon: MakeDaemon, mongo: Mongo, tmp_path: Path) -> None:
    seeded = await seed_history(mongo)
    archive = tmp_path / "archive"
    daemon = await make_daemon(queues={"reports": {"keep_completed": {"count": 2,
                                                                      "age": None}}},
                               archive_dir=str(archive))
    assert daemon.engine.retention_owner == "maintenance"  # the engine keeps them for us
    await finished_reports(daemon, 5)
    runs_before = sorted(await ids(mongo, RUNS, {"queue": "reports"}))
    retention, archived = await upkeep(daemon).retention(budget(), datetime.now(UTC))

    assert retention[RUNS] == {"archived": 3, "deleted": 3, "more": False}
    assert retention[NOTIFICATIONS] == {"archived": 1, "deleted": 1, "more": False}
    assert retention[ALERT_HISTORY] == {"archived": 1, "deleted": 1, "more": False}
    assert retention[HEALTH_FOLDER] == {"archived": 1, "deleted": 1, "more": False}
    # the three oldest runs went (by finish time), the newest two stay
    assert sorted(await ids(mongo, RUNS, {"queue": "reports"})) == runs_before[3:]
    assert await ids(mongo, NOTIFICATIONS) == {seeded["undelivered"], seeded["recent"]}
    [note] = await mongo.call(lambda db: db[INTEGRATION_STATE].find({}).to_list(None))
    assert [e["outcome"] for e in note["health"]["history"]] == ["healthy"]

    # One file per UTC day the runs finished on (two if the test ran across midnight).
    runs_files = sorted((archive / RUNS).glob(f"{RUNS}-*.ndjson.gz"))
    archived_runs = [r for f in runs_files for r in read_archive(f)]
    for f in runs_files:
        for r in read_archive(f):
            day = datetime.fromisoformat(str(r["finishedAt"]["$date"]).replace("Z", "+00:00"))
            assert f.name == f"{RUNS}-{day.astimezone(UTC).date().isoformat()}.ndjson.gz"
    runs_file = runs_files[0]
    assert sorted(ObjectId(r["_id"]["$oid"]) for r in archived_runs) == runs_before[:3]
    assert all(r["state"] == "completed" and "$date" in r["finishedAt"] for r in archived_runs)
    [note_line] = read_archive(archive / NOTIFICATIONS /
                               f"{NOTIFICATIONS}-{OLD.date().isoformat()}.ndjson.gz")
    assert note_line["_id"] == seeded["old"]
    [entry] = read_archive(archive / HEALTH_FOLDER /
                           f"{HEALTH_FOLDER}-{OLD.date().isoformat()}.ndjson.gz")
    assert (entry["integrationId"], entry["tenantId"], entry["outcome"]) == ("i1", "t1",
                                                                            "failing")
    assert oct(runs_file.stat().st_mode & 0o777) == "0o600"
    assert not [p for p in archive.rglob("*") if p.name.endswith(".tmp")]
    if shutil.which("jq") and shutil.which("zcat"):  # as an operator reads it
        out = await asyncio.to_thread(
            subprocess.run, f"zcat {' '.join(map(str, runs_files))} | jq -c '.state'",
            shell=True,
            capture_output=True, text=True, check=True)
        assert out.stdout.split() == ['"completed"'] * 3

    async def counted() -> bool:  # the engine's finished counter follows the deletions
        return (await daemon.operations.stats())["reports"]["completed"] == 2

    await wait_for(counted, message="the completed counter to drop to 2")

    # A second run the same day appends to the day's file (one more gzip member).
    await finished_reports_more(daemon, 2)
    await upkeep(daemon).retention(budget(), datetime.now(UTC))
    assert len(read_archive(runs_file)) == 5
    assert archived is not None and archived["folders"][RUNS]["files"] == 1


async def finished_reports_more(daemon: Daemon, n: int) -> None:
    before = (await daemon.operations.stats())["reports"]["completed"]
    for i in range(n):
        await daemon.engine.add("reports", {"n": 100 + i})

    async def done() -> bool:
        return (await daemon.operations.stats())["reports"]["completed"] == before + n

    await wait_for(done, message="more reports to complete")


async def test_a_failed_write_leaves_no_file_and_deletes_nothing(
        make_upkeep: Callable[..., Upkeep], mongo: Mongo, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    seeded = await seed_history(mongo)
    archive = tmp_path / "archive"
    made = make_upkeep(archive_dir=str(archive))

    def disk_full(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError, match="No space"):
        await made.retention(budget(), datetime.now(UTC))
    assert seeded["old"] in await ids(mongo, NOTIFICATIONS)  # not archived: not deleted
    assert not list(archive.rglob("*.gz"))  # complete or absent
    assert not list(archive.rglob("*.tmp"))


async def test_without_an_archive_history_is_only_deleted_and_runs_stay_the_engines(
        make_upkeep: Callable[..., Upkeep], mongo: Mongo) -> None:
    seeded = await seed_history(mongo)
    made = make_upkeep()
    assert made.engine.retention_owner is None  # the engine trims runs itself
    retention, archived = await made.retention(budget(), datetime.now(UTC))
    assert RUNS not in retention
    assert retention[NOTIFICATIONS] == {"archived": 0, "deleted": 1, "more": False}
    assert archived is None
    assert seeded["old"] not in await ids(mongo, NOTIFICATIONS)


async def test_the_backend_audit_log_only_when_it_exists(
        make_upkeep: Callable[..., Upkeep], mongo: Mongo, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    made = make_upkeep(archive_dir=str(tmp_path), audit_days=30)
    caplog.set_level(logging.INFO)
    await made.retention(budget(), datetime.now(UTC))
    await made.retention(budget(), datetime.now(UTC))
    said = [r for r in caplog.records if "no backend audit log" in r.getMessage()]
    assert len(said) == 1  # said once, not at every run
    assert "auditLogs" not in await MaintenanceStore(mongo).collection_names()

    old_text = (NOW - timedelta(days=45)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    new_text = (NOW - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    await insert(mongo, "auditLogs", [
        {"_id": "a1", "action": "project.create", "timestamp": NOW - timedelta(days=40)},
        {"_id": "a2", "action": "files.list", "timestamp": old_text},  # as the JSON line has it
        {"_id": "a3", "action": "files.list", "timestamp": new_text},
        {"_id": "a4", "action": "project.update", "timestamp": NOW}])
    retention, _ = await made.retention(budget(), datetime.now(UTC))
    assert retention["auditLogs"] == {"archived": 2, "deleted": 2, "more": False}
    assert await ids(mongo, "auditLogs") == {"a3", "a4"}
    lines = [line for f in (tmp_path / "auditLogs").glob("*.gz") for line in read_archive(f)]
    assert sorted(line["_id"] for line in lines) == ["a1", "a2"]


async def test_rotation_by_count_and_age(make_upkeep: Callable[..., Upkeep],
                                        tmp_path: Path) -> None:
    folder = tmp_path / NOTIFICATIONS
    folder.mkdir()
    days = [NOW.date() - timedelta(days=d) for d in (1, 2, 3, 50)]
    for day in days:
        with gzip.open(folder / f"{NOTIFICATIONS}-{day.isoformat()}.ndjson.gz", "wt") as f:
            f.write('{"_id": 1}\n')
    stale = folder / f".{NOTIFICATIONS}-x.ndjson.gz.abc.tmp"
    stale.write_bytes(b"half")
    os.utime(stale, (0, 0))
    made = make_upkeep(archive_dir=str(tmp_path), archive_keep_files=2, archive_keep_days=10)
    _, archived = await made.retention(budget(), datetime.now(UTC))
    assert archived is not None
    left = sorted(p.name for p in folder.iterdir())
    assert left == sorted(f"{NOTIFICATIONS}-{d.isoformat()}.ndjson.gz" for d in days[:2])
    assert sorted(archived["rotated"]) == sorted(
        f"{NOTIFICATIONS}-{d.isoformat()}.ndjson.gz" for d in days[2:])


async def test_a_spent_budget_leaves_the_rest_for_the_next_run(
        make_upkeep: Callable[..., Upkeep], mongo: Mongo) -> None:
    await insert(mongo, ALERT_HISTORY, [{"at": OLD + timedelta(seconds=i), "rule": "r"}
                                        for i in range(30)])
    made = make_upkeep(batch_size=10)
    spent = Budget(0.0)
    retention, _ = await made.retention(spent, datetime.now(UTC))
    assert spent.exhausted is True
    assert retention[ALERT_HISTORY]["more"] is True
    assert len(await ids(mongo, ALERT_HISTORY)) == 30
    retention, _ = await made.retention(budget(), datetime.now(UTC))
    assert retention[ALERT_HISTORY] == {"archived": 0, "deleted": 30, "more": False}


# -- the database report -----------------------------------------------------------------------


async def test_the_report_finds_orphans_missing_indexes_and_sizes(
        make_upkeep: Callable[..., Upkeep], mongo: Mongo) -> None:
    tenant = await insert_tenant(mongo, "auth0|owner")
    gone_tenant = str(ObjectId())
    provider = ObjectId()
    await insert(mongo, PROVIDERS, [{"_id": provider, "name": "Drive", "slug": "gdrive"}])
    live = await insert_integration(mongo, None, provider=str(provider), tenant_id=tenant)
    legacy = ObjectId()  # an older integration whose _id is a real ObjectId
    await insert(mongo, INTEGRATIONS, [{"_id": legacy, "tenantId": tenant,
                                        "providerId": str(provider), "status": "active"}])
    stray = await insert_integration(mongo, None, provider=str(ObjectId()),
                                     tenant_id=gone_tenant)
    await insert(mongo, PROJECTS, [
        {"_id": "p-ok", "tenantId": tenant, "cloudIntegrationId": live},
        {"_id": "p-legacy", "tenantId": tenant, "cloudIntegrationId": str(legacy)},
        {"_id": "p-no-tenant", "tenantId": gone_tenant, "cloudIntegrationId": live},
        {"_id": "p-no-integration", "tenantId": tenant, "cloudIntegrationId": new_hex_id()}])
    made = make_upkeep()
    await IntegrationStore(mongo).ensure_indexes()
    await mongo.call(lambda db: db[INTEGRATIONS].drop_index("mwapjobs_updatedAt"))
    report = await made.report_maker.make()

    orphans = report["orphans"]
    assert orphans["projectsWithoutTenant"]["count"] == 1
    assert orphans["projectsWithoutTenant"]["sample"] == ["p-no-tenant"]
    assert orphans["integrationsWithoutTenant"]["sample"] == [stray]
    assert orphans["integrationsWithoutProvider"]["sample"] == [stray]
    assert orphans["projectsWithoutIntegration"]["sample"] == ["p-no-integration"]  # not legacy
    found = {(i["collection"], tuple(i["keys"]), i["owner"]): i for i in report["indexes"]}
    assert found[(TENANTS, ("ownerId",), "backend")]["present"] is False  # nobody made it here
    ours = found[(INTEGRATIONS, ("updatedAt",), "mwapjobs")]
    assert ours["present"] and ours["created"]  # ours is made again
    assert found[(PROJECTS, ("cloudIntegrationId",), "recommended")]["present"] is False
    sizes = report["sizes"]["collections"][INTEGRATIONS]
    assert sizes["count"] == 3
    assert "refused" in sizes or sizes["size"] > 0  # collStats, or why not
    assert await ids(mongo, PROJECTS) == {"p-ok", "p-legacy", "p-no-tenant",
                                          "p-no-integration"}  # never deletes

    made.report_maker.settings = made.settings.model_copy(
        update={"create_recommended_indexes": True})
    indexes = await made.report_maker.indexes()
    recommended = {tuple(i["keys"]): i for i in indexes if i["owner"] == "recommended"}
    assert all(i["present"] for i in recommended.values())
    assert recommended[("tenantId",)]["by"] == "mwapjobs_recommended_tenantId"
    assert recommended[("cloudIntegrationId",)]["created"]
    # a compound index of ours that starts with providerId serves it already: none made
    assert recommended[("providerId",)]["by"] == "mwapjobs_providerId_tokenExpiresAt"
    assert not recommended[("providerId",)]["created"]
    assert (await mongo.call(lambda db: db[TENANTS].index_information())).keys() == {"_id_"}


async def test_a_command_the_server_refuses_is_reported_not_raised(mongo: Mongo) -> None:
    answer = await MaintenanceStore(mongo).command("mwapjobsNoSuchCommand")
    assert isinstance(answer, str) and answer


# -- API, metrics, settings --------------------------------------------------------------------


async def test_api_runs_upkeep_and_serves_the_report_and_metrics(
        make_daemon: MakeDaemon, mongo: Mongo) -> None:
    await insert(mongo, PROJECTS, [{"_id": "p1", "tenantId": str(ObjectId())}])
    daemon = await make_daemon()
    status, body = await call(daemon, "GET", "/api/v1/maintenance/report")
    assert status == 200 and body["data"]["report"] is None and body["data"]["enabled"]
    status, body = await call(daemon, "POST", "/api/v1/maintenance/run")
    assert status == 202, body
    run_id = body["data"]["runId"]

    async def finished() -> bool:
        _, run = await call(daemon, "GET", f"/api/v1/queues/runs/{run_id}")
        return bool(run["data"]["state"] == "completed")

    await wait_for(finished, message="the upkeep run")
    _, run = await call(daemon, "GET", f"/api/v1/queues/runs/{run_id}")
    assert run["data"]["result"]["orphans"]["projectsWithoutTenant"] == 1
    status, body = await call(daemon, "GET", "/api/v1/maintenance/report")
    assert body["data"]["report"]["runId"] == run_id
    assert body["data"]["report"]["orphans"]["projectsWithoutTenant"]["count"] == 1
    assert (await call(daemon, "GET", "/api/v1/maintenance/report", token="wrong"))[0] == 401
    metrics = (await daemon.metrics.exposition()).decode()
    assert 'mwapjobs_maintenance_orphans{kind="projectsWithoutTenant"} 1.0' in metrics
    assert 'mwapjobs_maintenance_missing_indexes{owner="backend"}' in metrics
    _, repeats = await call(daemon, "GET", "/api/v1/queues/repeats?queue=maintenance")
    assert [r["jobId"] for r in repeats["data"]] == ["daily"]


async def test_disabled_means_no_queue_and_a_503(make_daemon: MakeDaemon) -> None:
    daemon = await make_daemon(enabled=False)
    assert daemon.jobs["maintenance"] is None
    assert "maintenance" not in daemon.registry
    status, body = await call(daemon, "POST", "/api/v1/maintenance/run")
    assert status == 503 and body["error"]["code"] == "maintenance/disabled"
    status, body = await call(daemon, "GET", "/api/v1/maintenance/report")
    assert status == 200 and body["data"]["enabled"] is False
