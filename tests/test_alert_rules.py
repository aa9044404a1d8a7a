"""Alerting: the rules, firing once, quiet during the cool-down, resolving; the
mongodb_down rule in a running daemon, during an outage and at boot."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import mongomock
import pytest

from mwapjobs.alerts.channels import parse_recipients
from mwapjobs.alerts.rules import default_rules, duration
from mwapjobs.daemon import Daemon
from mwapjobs.jobs.health.rules import sweep_missed
from mwapjobs.jobs.health.schedule import QUEUE as HEALTH_QUEUE
from mwapjobs.jobs.refresh.rules import rules as refresh_rules
from mwapjobs.jobs.refresh.runs import QUEUE as REFRESH_QUEUE
from mwapjobs.storage.mongo import Mongo
from mwapjobs.triggers import longest_gap
from tests.conftest import REAL_MONGODB_URI, make_settings, wait_for
from tests.support.alerting import (
    RecordingChannel,
    Ticker,
    WallClock,
    add_runs,
    clear_runs,
    manager,
    registry,
)
from tests.support.flaky import FlakyMongo
from tests.support.receivers import WebhookReceiver

# -- firing, cool-down, resolve -------------------------------------------------------


async def test_fires_once_then_quiet_during_cooldown_then_again_and_resolves(
        mongo: Mongo) -> None:
    tick = Ticker()
    m = manager(mongo, registry("q"), [RecordingChannel()],
                alerts={"failed_runs_threshold": 2, "cooldown": 60}, monotonic=tick)
    await add_runs(mongo, "q", "failed", 3)

    first = await m.evaluate()
    assert [x.text for x in first] == [
        "[mwapjobs] FIRING: failed_runs (queue q): 3 runs failed in the last 15m "
        "(threshold: more than 2)\nRunbook: docs/runbooks/failed_runs.md"]
    assert first[0].event["runbook"] == "docs/runbooks/failed_runs.md"
    assert first[0].event["alert"] == "failed_runs" and first[0].event["subject"] == "queue q"
    tick.t += 30
    assert await m.evaluate() == []  # still true, but within the cool-down
    tick.t += 31
    again = await m.evaluate()  # cool-down over, still true: fires again
    assert [x.kind for x in again] == ["firing"] and again[0].event["repeat"] is True
    assert [s.label for s in m.firing()] == ["failed_runs (queue q)"]

    await clear_runs(mongo, "q", "failed")
    done = await m.evaluate()
    assert [x.text for x in done] == ["[mwapjobs] RESOLVED: failed_runs (queue q)"]
    assert await m.evaluate() == []  # resolved once
    assert m.firing() == []


async def test_a_condition_back_within_the_cooldown_waits_for_it(mongo: Mongo) -> None:
    tick = Ticker()
    m = manager(mongo, registry("q"), [RecordingChannel()],
                alerts={"failed_runs_threshold": 1, "cooldown": 60}, monotonic=tick)
    await add_runs(mongo, "q", "failed", 2)
    assert [x.kind for x in await m.evaluate()] == ["firing"]
    await clear_runs(mongo, "q", "failed")
    tick.t += 5
    assert [x.kind for x in await m.evaluate()] == ["resolved"]
    await add_runs(mongo, "q", "failed", 2)
    tick.t += 5
    assert await m.evaluate() == []  # flapping: quiet until the cool-down ends
    tick.t += 51
    assert [x.kind for x in await m.evaluate()] == ["firing"]


async def test_messages_reach_channels_through_the_dispatcher(mongo: Mongo) -> None:
    channel = RecordingChannel()
    m = manager(mongo, registry("q"), [channel], alerts={"failed_runs_threshold": 1,
                                                         "check_interval": 3600})
    await m.start()
    try:
        await add_runs(mongo, "q", "failed", 2)
        await m.evaluate()
        await wait_for(lambda: len(channel.sent) == 1, message="delivery")
        assert channel.texts[0].startswith("[mwapjobs] FIRING: failed_runs (queue q)")
    finally:
        await m.stop()


# -- the rules ------------------------------------------------------------------------


async def test_failed_runs_counts_each_queue_within_the_window_only(mongo: Mongo) -> None:
    m = manager(mongo, registry("a", "b"), [RecordingChannel()],
                alerts={"failed_runs_threshold": 2, "failed_runs_window": 60})
    await add_runs(mongo, "a", "failed", 2)             # not more than 2
    await add_runs(mongo, "a", "failed", 5, ago=120)     # outside the window
    await add_runs(mongo, "b", "failed", 3)
    await add_runs(mongo, "b", "completed", 10)
    texts = [x.text for x in await m.evaluate()]
    assert texts == ["[mwapjobs] FIRING: failed_runs (queue b): 3 runs failed in the last 1m "
                     "(threshold: more than 2)\nRunbook: docs/runbooks/failed_runs.md"]
    await add_runs(mongo, "a", "failed", 1)
    assert [x.event["subject"] for x in await m.evaluate()] == ["queue a"]


async def test_refresh_failure_rate_needs_the_minimum_and_the_rate(mongo: Mongo) -> None:
    m = manager(mongo, registry(REFRESH_QUEUE), [RecordingChannel()],
                alerts={"refresh_failure_rate": 0.2, "refresh_failure_min": 5,
                        "failed_runs_threshold": 1000},
                rules=[*default_rules(), *refresh_rules()])
    await add_runs(mongo, REFRESH_QUEUE, "failed", 4)
    assert await m.evaluate() == []  # 100 % but fewer than 5 failures
    await add_runs(mongo, REFRESH_QUEUE, "failed", 1)
    await add_runs(mongo, REFRESH_QUEUE, "completed", 20)
    assert await m.evaluate() == []  # 5 of 25 = 20 %: not above
    await add_runs(mongo, REFRESH_QUEUE, "failed", 1)
    fired = await m.evaluate()  # 6 of 26 = 23 %
    assert [x.text for x in fired] == [
        "[mwapjobs] FIRING: refresh_failures: 6 of 26 token refreshes failed in the last 15m "
        "(23%; threshold: above 20% with at least 5 failures)"
        "\nRunbook: docs/runbooks/refresh_failures.md"]
    await add_runs(mongo, REFRESH_QUEUE, "completed", 10)
    assert [x.text for x in await m.evaluate()] == ["[mwapjobs] RESOLVED: refresh_failures"]


async def test_backlog_fires_for_an_old_waiting_run_but_not_in_a_paused_queue(
        mongo: Mongo) -> None:
    paused: set[str] = set()
    m = manager(mongo, registry("busy", "fine", "held"), [RecordingChannel()],
                alerts={"backlog_age": 60}, is_paused=paused.__contains__)
    await add_runs(mongo, "fine", "waiting", 3, ago=10)
    await add_runs(mongo, "busy", "waiting", 3, ago=10, priority=5)
    await add_runs(mongo, "busy", "waiting", 1, ago=300, priority=-1)  # starved, low priority
    await add_runs(mongo, "held", "waiting", 1, ago=300)
    await add_runs(mongo, "fine", "delayed", 1, ago=-3600)
    paused.add("held")
    texts = [x.text for x in await m.evaluate()]
    assert texts == ["[mwapjobs] FIRING: backlog (queue busy): the oldest waiting run has "
                     "waited 5m (threshold: 1m)\nRunbook: docs/runbooks/backlog.md"]
    await clear_runs(mongo, "busy", "waiting")
    assert [x.text for x in await m.evaluate()] == ["[mwapjobs] RESOLVED: backlog (queue busy)"]


async def test_health_sweep_missed_after_the_given_number_of_intervals(mongo: Mongo) -> None:
    wall = WallClock()
    m = manager(mongo, registry(HEALTH_QUEUE), [RecordingChannel()],
                alerts={"health_sweep_missed_intervals": 2, "cooldown": 0}, clock=wall,
                rules=[*default_rules(), sweep_missed(60.0)])
    assert await m.evaluate() == []  # never ran, but the daemon just started
    wall.now += timedelta(seconds=121)
    fired = await m.evaluate()
    assert [x.event["alert"] for x in fired] == ["health_sweep_missed"]
    assert "none since start-up" in fired[0].text and "threshold 2m" in fired[0].text

    await add_runs(mongo, HEALTH_QUEUE, "completed", 1, ago=0)
    wall.now = datetime.now(UTC)
    assert [x.text for x in await m.evaluate()] == ["[mwapjobs] RESOLVED: health_sweep_missed"]
    wall.now += timedelta(seconds=100)
    assert await m.evaluate() == []  # 100 s < 2 × 60 s
    wall.now += timedelta(seconds=30)
    assert [x.event["alert"] for x in await m.evaluate()] == ["health_sweep_missed"]


async def test_the_jobs_add_their_rules_only_when_enabled(mongo: Mongo) -> None:
    def rules_of(daemon: Daemon) -> set[str]:
        return {rule.name for rule in daemon.alerts.rules}

    generic = {rule.name for rule in default_rules()}
    on = Daemon(make_settings(alerting_enabled=True), mongo=mongo)
    off = Daemon(make_settings(alerting_enabled=True, health={"enabled": False},
                               refresh={"enabled": False}, files={"enabled": False}),
                 mongo=mongo)
    for daemon in (on, off):
        daemon.app()  # plugs the jobs in
    assert rules_of(on) == generic | {"refresh_failures", "provider_on_hold",
                                      "provider_url_changed", "health_sweep_missed",
                                      "file_sync_failing"}
    assert rules_of(off) == generic
    for daemon in (on, off):
        assert daemon.http is not None
        await daemon.http.close()


def test_health_interval_comes_from_the_cron() -> None:
    assert longest_gap("0 */4 * * *") == 4 * 3600
    assert longest_gap("*/15 * * * *") == 900
    monday = datetime(2026, 3, 2, 12, tzinfo=UTC)
    assert longest_gap("0 9 * * 1-5", now=monday) == 3 * 86400  # Friday to Monday
    settings_default = make_settings().health
    assert longest_gap(settings_default.cron, settings_default.timezone) == 4 * 3600


async def test_mongodb_down_rule_needs_no_database_and_db_rules_keep_their_state() -> None:
    mongo = FlakyMongo.from_clients(mongomock.MongoClient(tz_aware=True))
    tick = Ticker()
    down_since: list[float | None] = [None]
    m = manager(mongo, registry("q"), [RecordingChannel()], monotonic=tick,
                alerts={"failed_runs_threshold": 1, "mongodb_down_for": 60},
                mongo_down_since=lambda: down_since[0],
                mongo_error=lambda: "ServerSelectionTimeoutError: injected")
    try:
        await add_runs(mongo, "q", "failed", 2)
        assert [x.event["alert"] for x in await m.evaluate()] == ["failed_runs"]
        mongo.down = True
        down_since[0] = tick.t
        tick.t += 30
        attempts = mongo.attempts
        assert await m.evaluate() == []
        assert mongo.attempts == attempts  # no query was even tried
        tick.t += 31
        fired = await m.evaluate()
        assert [x.text for x in fired] == [
            "[mwapjobs] FIRING: mongodb_down: MongoDB unreachable for 1m 1s: "
            "ServerSelectionTimeoutError: injected\nRunbook: docs/runbooks/mongodb_down.md"]
        assert {s.rule for s in m.firing()} == {"mongodb_down", "failed_runs"}  # kept
        mongo.down = False
        down_since[0] = None
        assert [x.text for x in await m.evaluate()] == ["[mwapjobs] RESOLVED: mongodb_down"]
    finally:
        mongo.close()


async def test_a_failing_database_does_not_crash_evaluation(caplog: Any) -> None:
    mongo = FlakyMongo.from_clients(mongomock.MongoClient(tz_aware=True))
    m = manager(mongo, registry("q"), [RecordingChannel()], alerts={"failed_runs_threshold": 1})
    try:
        await add_runs(mongo, "q", "failed", 2)
        assert len(await m.evaluate()) == 1
        mongo.down = True  # but nobody told the manager
        with caplog.at_level(logging.WARNING, logger="mwapjobs.alerts"):
            assert await m.evaluate() == []
            assert await m.evaluate() == []
        assert len(m.firing()) == 1  # an unknown state is not a resolution
        warned = [r for r in caplog.records if "could not be checked" in r.getMessage()]
        assert len({r.__dict__["rule"] for r in warned}) == len(warned)  # once per rule
        mongo.down = False
        await clear_runs(mongo, "q", "failed")
        assert [x.kind for x in await m.evaluate()] == ["resolved"]
    finally:
        mongo.close()


def test_duration_and_recipients() -> None:
    assert [duration(s) for s in (5, 61, 900, 3600, 7500, 90000)] == [
        "5s", "1m 1s", "15m", "1h", "2h 5m", "1d 1h"]
    assert parse_recipients(" a@x.io, b@x.io ;a@x.io,, ") == ("a@x.io", "b@x.io")
    assert parse_recipients(None) == ()

# -- mongodb_down in a running daemon ----------------------------------------------------


@pytest.mark.skipif(bool(REAL_MONGODB_URI), reason="injects an outage into the embedded store")
async def test_mongodb_down_alert_fires_during_the_outage_and_resolves() -> None:
    mongo = FlakyMongo.from_clients(mongomock.MongoClient(tz_aware=True))
    async with WebhookReceiver() as hook:
        settings = make_settings(slack_webhook_url=hook.url,
                                 alerts={"check_interval": 0.1, "mongodb_down_for": 0.3})
        daemon = Daemon(settings, mongo=mongo)
        await daemon.start()
        try:
            await daemon.wait_ready()
            mongo.down = True
            bodies = await hook.wait_for(1)
            assert bodies[0]["text"].startswith(
                "[mwapjobs] FIRING: mongodb_down: MongoDB unreachable for ")
            assert "injected outage" in bodies[0]["text"]
            mongo.down = False
            bodies = await hook.wait_for(2)
            assert bodies[1] == {"text": "[mwapjobs] RESOLVED: mongodb_down"}
        finally:
            await daemon.stop()
            mongo.close()


@pytest.mark.skipif(bool(REAL_MONGODB_URI), reason="injects an outage into the embedded store")
async def test_mongodb_down_at_boot_is_alerted_too() -> None:
    mongo = FlakyMongo.from_clients(mongomock.MongoClient(tz_aware=True))
    mongo.down = True
    async with WebhookReceiver() as hook:
        settings = make_settings(slack_webhook_url=hook.url,
                                 alerts={"check_interval": 0.1, "mongodb_down_for": 0.3})
        daemon = Daemon(settings, mongo=mongo)
        await daemon.start()
        try:
            bodies = await hook.wait_for(1)
            assert bodies[0]["text"].startswith("[mwapjobs] FIRING: mongodb_down")
            assert not daemon.engine.running
        finally:
            await daemon.stop()
            mongo.close()
