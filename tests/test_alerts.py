"""Alerting: rules, cool-down and resolve, channels (webhook, SMTP, log), and tenant
notifications, against a local webhook receiver and a real aiosmtpd server."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import mongomock
import pytest
from bson import ObjectId

from mwapjobs.alerts import AlertManager, Dispatcher, Message
from mwapjobs.alerts.channels import LogChannel, parse_recipients
from mwapjobs.alerts.rules import default_rules, duration
from mwapjobs.daemon import Daemon
from mwapjobs.jobs.health.rules import sweep_missed
from mwapjobs.jobs.health.schedule import QUEUE as HEALTH_QUEUE
from mwapjobs.jobs.refresh.rules import rules as refresh_rules
from mwapjobs.jobs.refresh.runs import QUEUE as REFRESH_QUEUE
from mwapjobs.queues import Job, PermanentError, QueueRegistry
from mwapjobs.storage.integrations import IntegrationStore
from mwapjobs.storage.mongo import Mongo
from mwapjobs.storage.names import NOTIFICATIONS, RUNS
from mwapjobs.triggers import longest_gap
from tests.conftest import REAL_MONGODB_URI, make_settings, wait_for
from tests.support.flaky import FlakyMongo
from tests.support.receivers import SmtpReceiver, WebhookReceiver, free_port
from tests.support.tls import self_signed


class RecordingChannel:
    """An in-memory channel; `fail` makes every send raise."""

    def __init__(self, name: str = "recording") -> None:
        self.name = name
        self.sent: list[Message] = []
        self.attempts = 0
        self.fail = False

    async def send(self, message: Message) -> None:
        self.attempts += 1
        if self.fail:
            raise RuntimeError("channel down (test)")
        self.sent.append(message)

    async def close(self) -> None:
        return None

    @property
    def texts(self) -> list[str]:
        return [m.text for m in self.sent]


class Ticker:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class WallClock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


async def noop(job: Job) -> None:
    return None


def registry(*queues: str) -> QueueRegistry:
    reg = QueueRegistry()
    for name in queues:
        reg.register(name, noop)
    return reg


def manager(mongo: Mongo, reg: QueueRegistry, channels: list[Any] | None = None,
            alerts: dict[str, Any] | None = None, **kwargs: Any) -> AlertManager:
    settings = make_settings(alerts=alerts or {}, **kwargs.pop("settings", {}))
    return AlertManager(settings, mongo, reg, channels=channels, **kwargs)


async def add_runs(mongo: Mongo, queue: str, state: str, n: int, *, ago: float = 1.0,
                   priority: int = 0) -> None:
    at = datetime.now(UTC) - timedelta(seconds=ago)
    docs = [{"_id": ObjectId(), "queue": queue, "state": state, "priority": priority,
             "runAt": at, "createdAt": at,
             **({"finishedAt": at} if state in ("completed", "failed") else {})}
            for _ in range(n)]
    await mongo.call(lambda db: db[RUNS].insert_many(docs))


async def clear_runs(mongo: Mongo, queue: str, state: str) -> None:
    await mongo.call(lambda db: db[RUNS].delete_many({"queue": queue, "state": state}))


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
        "(threshold: more than 2)"]
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
                     "(threshold: more than 2)"]
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
        "(23%; threshold: above 20% with at least 5 failures)"]
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
                     "waited 5m (threshold: 1m)"]
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
                               refresh={"enabled": False}), mongo=mongo)
    for daemon in (on, off):
        daemon.app()  # plugs the jobs in
    assert rules_of(on) == generic | {"refresh_failures", "provider_on_hold",
                                      "provider_url_changed", "health_sweep_missed"}
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
            "ServerSelectionTimeoutError: injected"]
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


# -- channels ----------------------------------------------------------------------------


async def test_webhooks_receive_slack_compatible_json(mongo: Mongo) -> None:
    async with WebhookReceiver() as slack, WebhookReceiver() as generic:
        m = manager(mongo, registry("q"), alerts={"failed_runs_threshold": 1,
                                                  "check_interval": 3600},
                    settings={"slack_webhook_url": slack.url,
                              "alert_webhook_url": generic.url})
        assert [c.name for c in m.channels] == ["log", "slack", "webhook"]
        await m.start()
        try:
            await add_runs(mongo, "q", "failed", 2)
            await m.evaluate()
            [body] = await slack.wait_for(1)
            assert body == {"text": "[mwapjobs] FIRING: failed_runs (queue q): 2 runs failed "
                                    "in the last 15m (threshold: more than 1)"}
            [event] = await generic.wait_for(1)
            assert event["text"] == body["text"]
            assert event["event"]["status"] == "firing"
            assert event["event"]["rule"] == "failed_runs (queue q)"
            assert event["event"]["subject"] == "queue q"
        finally:
            await m.stop()


async def test_email_goes_to_every_recipient_over_smtp(mongo: Mongo) -> None:
    with SmtpReceiver() as smtp:
        m = manager(mongo, registry("q"),
                    alerts={"failed_runs_threshold": 1, "check_interval": 3600,
                            "email_from": "mwapjobs@example.org"},
                    settings={"smtp_host": smtp.host, "smtp_port": smtp.port,
                              "alert_email_recipients": "ops@example.org, oncall@example.org"})
        assert [c.name for c in m.channels] == ["log", "email"]
        await m.start()
        try:
            await add_runs(mongo, "q", "failed", 2)
            [fired] = await m.evaluate()
            [mail] = await smtp.wait_for_async(1)
        finally:
            await m.stop()
    assert mail.mail_from == "mwapjobs@example.org"
    assert mail.rcpt_tos == ["ops@example.org", "oncall@example.org"]
    assert mail.email["To"] == "ops@example.org, oncall@example.org"
    assert mail.email["Subject"] == fired.text
    assert fired.text in mail.email.get_content()


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
async def test_smtp_logs_in_only_over_tls(mongo: Mongo, caplog: Any, tmp_path: Path,
                                          tls: str) -> None:
    password = "s3cret-smtp-pass"
    cert = self_signed(tmp_path)
    with SmtpReceiver(auth=("alerts", password), tls=tls, cert=cert) as smtp:
        m = manager(mongo, registry("q"), alerts={"check_interval": 3600,
                                                  "smtp_ca_file": str(cert.cert)},
                    settings={"smtp_host": smtp.host, "smtp_port": smtp.port,
                              "smtp_secure": tls == "implicit",
                              "smtp_user": "alerts", "smtp_pass": password,
                              "alert_email_recipients": "ops@example.org"})
        await m.start()
        try:
            with caplog.at_level(logging.DEBUG):
                m.dispatcher.submit(Message("firing", "[mwapjobs] FIRING: test: auth"))
                await smtp.wait_for_async(1)
        finally:
            await m.stop()
    assert smtp.logins == [("alerts", True)]
    assert password not in caplog.text


@pytest.mark.parametrize("allow_plaintext", [False, True])
async def test_no_password_in_clear_when_starttls_is_missing_or_stripped(
        mongo: Mongo, caplog: Any, allow_plaintext: bool) -> None:
    """A server (or a man in the middle) that offers no STARTTLS gets no password."""
    password = "s3cret-smtp-pass"
    with SmtpReceiver(auth=("alerts", password)) as smtp:
        m = manager(mongo, registry("q"), alerts={
                        "check_interval": 3600, "smtp_allow_plaintext": allow_plaintext},
                    settings={"smtp_host": smtp.host, "smtp_port": smtp.port,
                              "smtp_user": "alerts", "smtp_pass": password,
                              "alert_email_recipients": "ops@example.org"})
        m.dispatcher.retry_base = 0.05
        await m.start()
        try:
            with caplog.at_level(logging.INFO):
                m.dispatcher.submit(Message("firing", "[mwapjobs] FIRING: test: clear"))
                if allow_plaintext:  # an explicit choice, for a relay on this machine
                    await smtp.wait_for_async(1)
                else:
                    await wait_for(lambda: any(
                        "refusing to send the password in clear" in str(r.__dict__.get("error"))
                        for r in caplog.records), timeout=10, message="the refusal")
                    # ...and the other channels (here: the log) are told so at once.
                    fired = [msg for msg in await m.evaluate()
                             if msg.text.startswith("[mwapjobs] FIRING: alert_channel_failing "
                                                    "(channel email)")]
                    assert fired and "in clear" in fired[0].text
        finally:
            await m.stop()
    if allow_plaintext:
        assert smtp.logins == [("alerts", True)]
    else:
        assert smtp.logins == [] and smtp.messages == []
    assert password not in caplog.text


async def test_smtp_failure_is_retried(mongo: Mongo) -> None:
    with SmtpReceiver() as smtp:
        smtp.fail_next(2)
        m = manager(mongo, registry("q"), alerts={"check_interval": 3600},
                    settings={"smtp_host": smtp.host, "smtp_port": smtp.port,
                              "alert_email_recipients": "ops@example.org"})
        m.dispatcher.retry_base = 0.05
        await m.start()
        try:
            m.dispatcher.submit(Message("firing", "[mwapjobs] FIRING: test: retried"))
            [mail] = await smtp.wait_for_async(1)
        finally:
            await m.stop()
    assert mail.email["Subject"] == "[mwapjobs] FIRING: test: retried"


async def test_log_channel_levels(caplog: Any) -> None:
    channel = LogChannel()
    with caplog.at_level(logging.INFO, logger="mwapjobs.alerts"):
        await channel.send(Message("firing", "[mwapjobs] FIRING: r: d", {"rule": "r"}))
        await channel.send(Message("resolved", "[mwapjobs] RESOLVED: r", {"rule": "r"}))
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("ERROR", "[mwapjobs] FIRING: r: d"), ("INFO", "[mwapjobs] RESOLVED: r")]
    assert caplog.records[0].__dict__["alert"] == {"rule": "r"}


async def test_a_hanging_channel_times_out_and_does_not_delay_the_others(caplog: Any) -> None:
    class Hanging(RecordingChannel):
        async def send(self, message: Message) -> None:
            self.attempts += 1
            await asyncio.sleep(3600)

    slow, fast = Hanging("slow"), RecordingChannel("fast")
    dispatcher = Dispatcher([slow, fast], timeout=0.1, retry_base=0.05)
    dispatcher.start()
    with caplog.at_level(logging.ERROR, logger="mwapjobs.alerts"):
        dispatcher.submit(Message("firing", "one"))
        dispatcher.submit(Message("firing", "two"))
        await wait_for(lambda: fast.texts == ["one", "two"], message="fast channel")
        await wait_for(lambda: slow.attempts >= 2, message="slow channel retried")
        await dispatcher.stop(flush_timeout=0.2)
    errors = [r for r in caplog.records if r.getMessage() == "alert delivery failed; will retry"]
    assert errors and errors[0].__dict__["error"] == "timed out after 0.1s"
    lost = [r for r in caplog.records if r.getMessage() == "alert not delivered before shutdown"]
    assert [r.__dict__["text"] for r in lost] == ["one", "two"]  # said, not silently lost


async def test_stop_gives_a_failing_channel_one_last_attempt(caplog: Any) -> None:
    broken = RecordingChannel("broken")
    broken.fail = True
    dispatcher = Dispatcher([broken], timeout=1, retry_base=60)
    dispatcher.start()
    dispatcher.submit(Message("firing", "lost"))
    await wait_for(lambda: broken.attempts == 1, message="first attempt")
    with caplog.at_level(logging.ERROR, logger="mwapjobs.alerts"):
        await dispatcher.stop(flush_timeout=0.3)
    assert broken.attempts == 2  # the 60 s backoff cut short once, no hot loop
    assert [r.getMessage() for r in caplog.records][-1] == "alert not delivered before shutdown"


@pytest.mark.skipif(bool(REAL_MONGODB_URI), reason="timing-sensitive on a shared server")
async def test_failing_webhook_blocks_no_jobs_and_the_alert_arrives_when_it_recovers(
        mongo: Mongo, caplog: Any) -> None:
    port = free_port()
    settings = make_settings(
        slack_webhook_url=f"http://127.0.0.1:{port}/hook",
        alerts={"check_interval": 0.1, "failed_runs_threshold": 2},
        refresh={"enabled": False}, health={"enabled": False},
    )
    daemon = Daemon(settings, mongo=mongo)
    daemon.alerts.dispatcher.retry_base = 0.05
    daemon.alerts.dispatcher.retry_max = 0.2
    done: list[int] = []

    async def fails(job: Job) -> None:
        raise PermanentError("boom")

    async def works(job: Job) -> None:
        done.append(job.data["n"])

    daemon.registry.register("bad", fails)
    daemon.registry.register("good", works)
    await daemon.start()
    try:
        await daemon.wait_ready()
        with caplog.at_level(logging.ERROR, logger="mwapjobs.alerts"):
            for _ in range(3):
                await daemon.engine.add("bad", {})
            await wait_for(lambda: _delivery_errors(caplog) >= 2,
                           message="delivery failing (connection refused)")
            for n in range(20):  # jobs keep completing while the channel is down
                await daemon.engine.add("good", {"n": n})
            await wait_for(lambda: sorted(done) == list(range(20)), message="jobs done")
            async with WebhookReceiver(port=port) as hook:
                hook.fail(500, times=2)
                [body] = await hook.wait_for(1)
                assert body["text"].startswith("[mwapjobs] FIRING: failed_runs (queue bad): 3 ")
                assert [status for status, _ in hook.requests] == [500, 500, 200]
                await wait_for(lambda: daemon.alerts.dispatcher.pending() == 0,
                               message="nothing left to deliver")
        errors = [r for r in caplog.records if r.getMessage().startswith("[mwapjobs] FIRING")]
        assert errors and errors[0].levelname == "ERROR"  # the log channel said it at once
    finally:
        await daemon.stop()


def _delivery_errors(caplog: Any) -> int:
    return sum(r.getMessage() == "alert delivery failed; will retry" for r in caplog.records)


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


# -- tenant-owner notifications --------------------------------------------------------------


async def notify(mongo: Mongo, reason: str = "invalid_grant: refresh token revoked") -> None:
    integration = {"_id": "65f000000000000000000001", "tenantId": "65f0000000000000000000aa",
                   "providerId": "65f0000000000000000000bb"}
    await IntegrationStore(mongo).notifications.record("integration.expired", integration, reason,
                                         datetime.now(UTC))


async def notifications(mongo: Mongo) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = await mongo.call(
        lambda db: db[NOTIFICATIONS].find({}).sort("createdAt", 1).to_list(None))
    return docs


async def test_tenant_notifications_are_delivered_and_marked(mongo: Mongo,
                                                             caplog: Any) -> None:
    async with WebhookReceiver() as hook:
        m = manager(mongo, registry(), settings={"slack_webhook_url": hook.url})
        await notify(mongo)
        await notify(mongo, "second")
        with caplog.at_level(logging.WARNING, logger="mwapjobs.alerts"):
            assert await m.deliver_notifications() == 2
        await m.stop()
        assert [b["text"] for b in hook.bodies] == [
            "[mwapjobs] NOTIFICATION: integration.expired: tenant 65f0000000000000000000aa, "
            "integration 65f000000000000000000001 (provider 65f0000000000000000000bb): "
            "invalid_grant: refresh token revoked",
            "[mwapjobs] NOTIFICATION: integration.expired: tenant 65f0000000000000000000aa, "
            "integration 65f000000000000000000001 (provider 65f0000000000000000000bb): second",
        ]
    docs = await notifications(mongo)
    assert [d["delivered"] for d in docs] == [True, True]
    assert all(sorted(d["deliveredTo"]) == ["log", "slack"] and d["deliveredAt"] for d in docs)
    logged = [r for r in caplog.records if r.getMessage().startswith("[mwapjobs] NOTIFICATION")]
    assert len(logged) == 2 and logged[0].levelname == "WARNING"
    assert await m.deliver_notifications() == 0  # nothing left


async def test_notifications_stay_undelivered_while_a_channel_fails(mongo: Mongo,
                                                                    caplog: Any) -> None:
    wall = WallClock()
    async with WebhookReceiver() as hook:
        m = manager(mongo, registry(), settings={"slack_webhook_url": hook.url}, clock=wall)
        m.notify_retry_base = 10
        hook.fail(500)
        await notify(mongo)
        await notify(mongo, "second")
        with caplog.at_level(logging.ERROR, logger="mwapjobs.alerts"):
            assert await m.deliver_notifications() == 0
        assert len(hook.requests) == 1  # a broken channel is tried once per pass
        errors = [r for r in caplog.records
                  if r.getMessage() == "notification delivery failed; will retry"]
        assert [(r.__dict__["channel"], r.__dict__["undelivered"]) for r in errors] == [
            ("slack", 2)]
        docs = await notifications(mongo)
        assert [d["delivered"] for d in docs] == [False, False]
        assert [d["deliveredTo"] for d in docs] == [["log"], ["log"]]  # the log took them
        assert [d["attempts"] for d in docs] == [1, 1]
        assert "slack: HTTP 500" in docs[0]["lastError"]

        assert await m.deliver_notifications() == 0  # not due yet: nothing tried
        assert len(hook.requests) == 1
        wall.now += timedelta(seconds=11)
        assert await m.deliver_notifications() == 0  # due, still failing
        docs = await notifications(mongo)
        assert [d["attempts"] for d in docs] == [2, 2]
        # backoff doubles: 20 s after the second failure
        assert all(abs((d["nextAttemptAt"].replace(tzinfo=UTC) - wall.now).total_seconds()
                       - 20) < 1 for d in docs)

        hook.recover()
        wall.now += timedelta(seconds=21)
        with caplog.at_level(logging.WARNING, logger="mwapjobs.alerts"):
            caplog.clear()
            assert await m.deliver_notifications() == 2
        assert len(hook.bodies) == 2
        assert not [r for r in caplog.records  # the log channel is not repeated
                    if r.getMessage().startswith("[mwapjobs] NOTIFICATION")]
        await m.stop()
    docs = await notifications(mongo)
    assert [d["delivered"] for d in docs] == [True, True]
    assert "lastError" not in docs[0] and "nextAttemptAt" not in docs[0]


async def test_the_daemon_delivers_notifications_in_the_background(mongo: Mongo) -> None:
    async with WebhookReceiver() as hook:
        daemon = Daemon(make_settings(slack_webhook_url=hook.url,
                                      alerts={"check_interval": 0.1}), mongo=mongo)
        await daemon.start()
        try:
            await daemon.wait_ready()
            await notify(mongo)
            [body] = await hook.wait_for(1)
            assert body["text"].startswith("[mwapjobs] NOTIFICATION: integration.expired")
            await wait_for(lambda: _all_delivered(mongo), message="marked delivered")
        finally:
            await daemon.stop()


async def _all_delivered(mongo: Mongo) -> bool:
    return all(d["delivered"] for d in await notifications(mongo))


# -- switched off --------------------------------------------------------------------------


async def test_alerting_disabled_sends_nothing(mongo: Mongo) -> None:
    async with WebhookReceiver() as hook:
        settings = make_settings(alerting_enabled=False, slack_webhook_url=hook.url,
                                 alerts={"check_interval": 0.05, "failed_runs_threshold": 1,
                                         "mongodb_down_for": 0.1})
        daemon = Daemon(settings, mongo=mongo)
        await daemon.start()
        try:
            await daemon.wait_ready()
            await add_runs(mongo, "token-refresh", "failed", 5)
            await notify(mongo)
            daemon.mongo_down_since = 0.0  # "down" for ages
            await asyncio.sleep(0.5)
            assert await daemon.alerts.evaluate() == []
            assert await daemon.alerts.deliver_notifications() == 0
            assert hook.requests == []
            assert [d["delivered"] for d in await notifications(mongo)] == [False]
        finally:
            daemon.mongo_down_since = None
            await daemon.stop()

