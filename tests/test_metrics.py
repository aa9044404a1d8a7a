"""GET /metrics: Prometheus exposition, per-daemon registry, access control."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Mapping
from datetime import timedelta
from typing import Any
from unittest import mock

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from mwapjobs.api.envelope import ApiError, envelope_middleware
from mwapjobs.api.keys import AUTH, METRICS, SETTINGS
from mwapjobs.api.metrics import is_loopback
from mwapjobs.api.metrics import metrics as metrics_handler
from mwapjobs.daemon import Daemon
from mwapjobs.jobs.refresh.metrics import refresh_outcome
from mwapjobs.jobs.refresh.runs import QUEUE as REFRESH_QUEUE
from mwapjobs.metrics import Source, failure_kind
from mwapjobs.queues import Job, PermanentError
from mwapjobs.storage.mongo import Mongo
from mwapjobs.storage.names import INTEGRATIONS
from tests.conftest import make_mongo, make_settings, wait_for

ADMIN_TOKEN = "metrics-test-admin-token"
ADMIN_SHA = hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()


async def handler(job: Job) -> dict[str, Any]:
    mode = job.data.get("mode", "ok")
    if mode == "permanent":
        raise PermanentError("no way")
    if mode == "transient":
        raise RuntimeError("try again later")
    if mode == "flaky" and job.attempt < 2:
        raise RuntimeError(f"attempt {job.attempt} fails")
    if mode == "slow":
        await asyncio.sleep(5)
    return {"attempt": job.attempt}


def make_daemon(mongo: Mongo, **settings: Any) -> Daemon:
    daemon = Daemon(make_settings(**settings), mongo=mongo)
    daemon.registry.register("q", handler, backoff={"delay": 0.05, "jitter": 0},
                             attempts=3, concurrency=10)
    return daemon


@pytest.fixture
async def daemon(mongo: Mongo) -> AsyncIterator[Daemon]:
    d = make_daemon(mongo)
    await d.start()
    await d.wait_ready()
    yield d
    await d.stop()


async def scrape(daemon: Daemon, headers: Mapping[str, str] | None = None
                 ) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as http, http.get(
        f"http://127.0.0.1:{daemon.port}/metrics", headers=headers
    ) as r:
        return r.status, r.headers["Content-Type"], await r.text()


def samples(text: str) -> list[Sample]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(text: str, name: str, **labels: str) -> float | None:
    """The value of sample `name` with exactly `labels`, or None if absent."""
    for s in samples(text):
        if s.name == name and s.labels == labels:
            return float(s.value)
    return None


def peer_request(daemon: Daemon, peer: tuple[str, int]) -> web.Request:
    """A GET /metrics request as if it came from `peer` (tests can only connect locally)."""
    app = web.Application()
    app[SETTINGS], app[AUTH], app[METRICS] = daemon.settings, daemon.auth, daemon.metrics
    transport = mock.Mock()
    transport.get_extra_info.side_effect = \
        lambda key, default=None: peer if key == "peername" else default
    return make_mocked_request("GET", "/metrics", app=app, transport=transport)


async def metrics_text(daemon: Daemon) -> str:
    status, _, text = await scrape(daemon)
    assert status == 200, text
    return text


async def test_exposition_parses_and_has_the_daemon_gauges(daemon: Daemon) -> None:
    status, content_type, text = await scrape(daemon)
    assert status == 200
    assert content_type.startswith("text/plain")
    assert "version=0.0.4" in content_type
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("mwapjobs_queue_runs", "mwapjobs_run_duration_seconds",
                 "mwapjobs_run_attempts", "mwapjobs_run_failures", "mwapjobs_run_retries",
                 "mwapjobs_run_stalled", "mwapjobs_token_refresh", "mwapjobs_integrations",
                 "mwapjobs_event_loop_lag_seconds", "mwapjobs_scheduler_up", "mwapjobs_ready",
                 "mwapjobs_mongodb_up", "mwapjobs_db_round_trips", "process_cpu_seconds"):
        assert name in families, name
    assert families["mwapjobs_run_duration_seconds"].type == "histogram"
    assert families["mwapjobs_run_attempts"].type == "counter"
    assert families["mwapjobs_queue_runs"].type == "gauge"
    assert value(text, "mwapjobs_ready") == 1
    assert value(text, "mwapjobs_scheduler_up") == 1
    assert value(text, "mwapjobs_mongodb_up") == 1
    assert value(text, "mwapjobs_metrics_source_up", source="queue_stats") == 1
    assert (value(text, "mwapjobs_db_round_trips_total", client="app") or 0) > 0
    assert value(text, "mwapjobs_db_round_trips_total", client="scheduler") is not None
    # Known series exist at zero before any event.
    assert value(text, "mwapjobs_run_attempts_total", queue="q", outcome="failed") == 0
    assert value(text, "mwapjobs_run_failures_total", queue="q", kind="deadline") == 0
    assert value(text, "mwapjobs_token_refresh_total", outcome="permanent_failure") == 0
    # Counters carry their own _created samples, which the parser accepts.
    assert value(text, "mwapjobs_run_attempts_created", queue="q", outcome="failed")


async def test_queue_gauges_match_stats_after_running_jobs(daemon: Daemon) -> None:
    ops = daemon.operations
    added = [await daemon.engine.add("q", {"mode": "ok"}) for _ in range(3)]
    added.append(await daemon.engine.add("q", {"mode": "permanent"}))
    await daemon.engine.add("q", {"mode": "ok"}, delay=600)
    await daemon.engine.add("q", {"mode": "ok"}, delay=900)
    for a in added:
        await a.settled(10)

    stats = await ops.stats()
    text = await metrics_text(daemon)
    assert stats["q"]["completed"] == 3
    assert stats["q"]["failed"] == 1
    assert stats["q"]["delayed"] == 2
    for queue, counts in stats.items():
        for state in ("waiting", "active", "delayed", "completed", "failed", "paused"):
            assert value(text, "mwapjobs_queue_runs", queue=queue, state=state) == \
                counts[state], (queue, state)
        assert value(text, "mwapjobs_queue_paused", queue=queue) == 0

    await ops.pause("q")
    await daemon.engine.add("q", {"mode": "ok"})
    text = await metrics_text(daemon)
    assert value(text, "mwapjobs_queue_runs", queue="q", state="paused") == 1
    assert value(text, "mwapjobs_queue_runs", queue="q", state="waiting") == 0
    assert value(text, "mwapjobs_queue_paused", queue="q") == 1


async def test_counters_and_histogram_move_with_outcomes(daemon: Daemon) -> None:
    engine = daemon.engine
    before = await metrics_text(daemon)
    assert value(before, "mwapjobs_run_duration_seconds_count", queue="q") == 0

    runs = [
        await engine.add("q", {"mode": "ok"}),
        await engine.add("q", {"mode": "ok"}),
        await engine.add("q", {"mode": "flaky"}),  # fails once, then completes
        await engine.add("q", {"mode": "permanent"}),
        await engine.add("q", {"mode": "transient"}, attempts=1),
        await engine.add("q", {"mode": "slow"}, attempts=1, timeout=0.05),
        # The retry would come after the deadline: it fails at once.
        await engine.add("q", {"mode": "transient"}, backoff={"delay": 60},
                         deadline=daemon.clock() + timedelta(seconds=30)),
    ]
    for r in runs:
        view = await r.settled(10)
        assert view["state"] in ("completed", "failed"), view

    text = await metrics_text(daemon)

    def v(name: str, **labels: str) -> float | None:
        return value(text, name, queue="q", **labels)

    assert v("mwapjobs_run_attempts_total", outcome="completed") == 3
    assert v("mwapjobs_run_attempts_total", outcome="retrying") == 1
    assert v("mwapjobs_run_attempts_total", outcome="failed") == 4
    assert v("mwapjobs_run_retries_total") == 1
    assert v("mwapjobs_run_failures_total", kind="permanent") == 1
    assert v("mwapjobs_run_failures_total", kind="transient") == 1
    assert v("mwapjobs_run_failures_total", kind="timeout") == 1
    assert v("mwapjobs_run_failures_total", kind="deadline") == 1
    assert v("mwapjobs_run_failures_total", kind="stalled") == 0
    # Every attempt is timed, failed and retried ones included: 3 + 1 + 4.
    assert v("mwapjobs_run_duration_seconds_count") == 8
    assert (v("mwapjobs_run_duration_seconds_sum") or 0) > 0
    assert v("mwapjobs_run_duration_seconds_bucket", le="+Inf") == 8

    # A stall (seen by the sweep) counts where the run went; failing counts as a failure.
    daemon.metrics.on_event("stalled", {"queue": "q", "runId": "x", "movedTo": "waiting"})
    daemon.metrics.on_event("stalled", {"queue": "q", "runId": "y", "movedTo": "failed"})
    text = await metrics_text(daemon)
    assert v("mwapjobs_run_stalled_total", moved_to="waiting") == 1
    assert v("mwapjobs_run_stalled_total", moved_to="failed") == 1
    assert v("mwapjobs_run_failures_total", kind="stalled") == 1


async def test_token_refresh_outcomes_from_real_runs(daemon: Daemon, mongo: Mongo) -> None:
    # No such integration: the handler skips it.
    skipped = await daemon.engine.add(REFRESH_QUEUE, {"integrationId": "missing"})
    # An integration whose provider does not exist: a permanent failure.
    await mongo.call(lambda db: db[INTEGRATIONS].insert_one(
        {"_id": "int-1", "tenantId": "t1", "providerId": "nope", "status": "active",
         "refreshToken": "encrypted"}))
    failed = await daemon.engine.add(REFRESH_QUEUE, {"integrationId": "int-1"})
    for r in (skipped, failed):
        await r.settled(10)
    text = await metrics_text(daemon)
    assert value(text, "mwapjobs_token_refresh_total", outcome="skipped") == 1
    assert value(text, "mwapjobs_token_refresh_total", outcome="permanent_failure") == 1
    assert value(text, "mwapjobs_token_refresh_total", outcome="refreshed") == 0
    assert value(text, "mwapjobs_token_refresh_total", outcome="transient_failure") == 0


def test_refresh_outcome_and_failure_kind_mapping() -> None:
    assert refresh_outcome("completed", {"result": {"expiresAt": "x", "rotated": False}}) \
        == "refreshed"
    assert refresh_outcome("completed", {"result": {"skipped": "revoked"}}) == "skipped"
    assert refresh_outcome("retrying", {"error": {"permanent": False}}) == "transient_failure"
    assert refresh_outcome("failed", {"error": {"permanent": False}}) == "transient_failure"
    assert refresh_outcome("failed", {"error": {"type": "RefreshFailed", "permanent": True}}) \
        == "permanent_failure"
    assert refresh_outcome("stalled", {"movedTo": "waiting"}) is None
    assert failure_kind({"error": {"type": "TransientError", "permanent": False,
                                   "deadlineExceeded": True}}) == "deadline"
    assert failure_kind({"error": {"type": "RefreshFailed", "permanent": True}}) == "permanent"
    assert failure_kind({"error": {"type": "TimeoutError", "permanent": False}}) == "timeout"
    assert failure_kind({"error": {"type": "RuntimeError", "permanent": False}}) == "transient"


async def test_integrations_by_status_and_a_failing_job_source(daemon: Daemon,
                                                              mongo: Mongo) -> None:
    await mongo.call(lambda db: db[INTEGRATIONS].insert_many([
        {"_id": "a", "status": "active"}, {"_id": "b", "status": "active"},
        {"_id": "c", "status": "expired"}, {"_id": "d"},
    ]))
    assert await daemon.integrations.count_by_status() == {"active": 2, "expired": 1,
                                                           "unknown": 1}
    text = await metrics_text(daemon)
    assert value(text, "mwapjobs_integrations", status="active") == 2
    assert value(text, "mwapjobs_integrations", status="expired") == 1
    assert value(text, "mwapjobs_integrations", status="unknown") == 1
    assert value(text, "mwapjobs_metrics_source_up", source="integrations") == 1

    async def broken() -> dict[str, int]:
        raise RuntimeError("health store unavailable")

    def families(value: Any) -> list[Metric]:
        family = GaugeMetricFamily("mwapjobs_test_things", "A job's gauge.")
        if value is not None:
            family.add_metric([], float(value))
        return [family]

    daemon.metrics.add_source(Source("things", broken, families))  # as a job adds one
    text = await metrics_text(daemon)  # a failing source never fails the scrape
    assert value(text, "mwapjobs_metrics_source_up", source="things") == 0
    assert value(text, "mwapjobs_metrics_source_up", source="integrations") == 1
    assert value(text, "mwapjobs_metrics_source_up", source="queue_stats") == 1
    assert value(text, "mwapjobs_queue_runs", queue="q", state="waiting") == 0


async def test_event_loop_lag_is_exposed(daemon: Daemon) -> None:
    await wait_for(lambda: len(daemon.loop_lag.samples) >= 3, message="loop lag samples")
    text = await metrics_text(daemon)
    for stat in ("p50", "p99", "max"):
        lag = value(text, "mwapjobs_event_loop_lag_seconds", stat=stat)
        assert lag is not None and lag >= 0, stat
    p99 = value(text, "mwapjobs_event_loop_lag_seconds", stat="p99")
    top = value(text, "mwapjobs_event_loop_lag_seconds", stat="max")
    assert p99 is not None and top is not None and top >= p99


async def test_before_mongodb_answers_the_scrape_reports_not_ready(mongo: Mongo) -> None:
    d = make_daemon(mongo)  # not started: MongoDB never checked, no engine
    text = (await d.metrics.exposition()).decode()
    assert value(text, "mwapjobs_ready") == 0
    assert value(text, "mwapjobs_scheduler_up") == 0
    assert value(text, "mwapjobs_mongodb_up") == 0
    assert value(text, "mwapjobs_metrics_source_up", source="queue_stats") == 0
    assert value(text, "mwapjobs_queue_runs", queue="q", state="waiting") is None
    assert d.mongo.round_trips == 0  # nothing was sent to an unreachable database


async def test_two_daemons_in_one_process_do_not_clash(daemon: Daemon) -> None:
    other_mongo, drop = make_mongo()
    other = make_daemon(other_mongo)
    await other.start()
    try:
        await other.wait_ready()
        assert other.metrics.registry is not daemon.metrics.registry
        run = await daemon.engine.add("q", {"mode": "ok"})
        await run.settled(10)
        mine, theirs = await metrics_text(daemon), await metrics_text(other)
        assert value(mine, "mwapjobs_run_attempts_total", queue="q", outcome="completed") == 1
        assert value(theirs, "mwapjobs_run_attempts_total", queue="q",
                     outcome="completed") == 0
        assert value(theirs, "mwapjobs_queue_runs", queue="q", state="completed") == 0
    finally:
        await other.stop()
        other_mongo.close()
        drop()


async def test_token_access_needs_an_admin_token(mongo: Mongo) -> None:
    d = make_daemon(mongo, metrics={"access": "token"},
                    admin={"tokens": [{"name": "ops", "sha256": ADMIN_SHA}]})
    await d.start()
    try:
        status, content_type, body = await scrape(d)
        assert status == 401
        assert content_type.startswith("application/json")
        assert '"auth/unauthorized"' in body
        status, _, body = await scrape(d, {"Authorization": "Bearer not-the-token"})
        assert status == 401
        status, content_type, body = await scrape(d, {"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert status == 200
        assert content_type.startswith("text/plain")
        assert any(s.name == "mwapjobs_ready" for s in samples(body))
    finally:
        await d.stop()


async def test_loopback_access_allows_local_and_refuses_remote_peers(daemon: Daemon) -> None:
    assert daemon.settings.metrics.access == "loopback"
    status, _, _ = await scrape(daemon)  # the tests connect from 127.0.0.1
    assert status == 200

    for peer, allowed in ((("10.1.2.3", 40000), False), (("127.0.0.1", 40000), True),
                          (("::1", 40000), True)):
        request = peer_request(daemon, peer)
        assert request.remote == peer[0]
        if allowed:
            response = await metrics_handler(request)
            assert response.status == 200
        else:
            with pytest.raises(ApiError) as refused:
                await metrics_handler(request)
            assert (refused.value.status, refused.value.code) == (403, "auth/forbidden")
            enveloped = await envelope_middleware(peer_request(daemon, peer), metrics_handler)
            assert isinstance(enveloped, web.Response) and enveloped.status == 403
            assert enveloped.text is not None
            assert json.loads(enveloped.text) == {"success": False, "error": {
                "code": "auth/forbidden", "message": refused.value.message}}


async def test_open_access_serves_anyone(mongo: Mongo) -> None:
    d = make_daemon(mongo, metrics={"access": "open"})
    response = await metrics_handler(peer_request(d, ("203.0.113.9", 5555)))
    assert response.status == 200
    assert response.body is not None


@pytest.mark.parametrize(
    ("remote", "expected"),
    [
        ("127.0.0.1", True), ("127.0.0.53", True), ("::1", True), ("::ffff:127.0.0.1", True),
        ("10.0.0.1", False), ("192.168.1.5", False), ("::ffff:10.0.0.1", False),
        ("2001:db8::1", False), ("fe80::1%eth0", False), ("", False), (None, False),
        ("localhost", False), ("not an address", False),
    ],
)
def test_loopback_predicate(remote: str | None, expected: bool) -> None:
    assert is_loopback(remote) is expected
