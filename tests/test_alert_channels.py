"""Alerting channels: Slack-compatible webhooks, SMTP (against a real aiosmtpd server,
TLS before any password), the log; the dispatcher's timeouts, retries and last
attempt at shutdown; a failing webhook in a daemon that keeps running jobs."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from mwapjobs.alerts import Dispatcher, Message
from mwapjobs.alerts.channels import LogChannel
from mwapjobs.daemon import Daemon
from mwapjobs.queues import Job, PermanentError
from mwapjobs.storage.mongo import Mongo
from tests.conftest import REAL_MONGODB_URI, make_settings, wait_for
from tests.support.alerting import RecordingChannel, add_runs, manager, registry
from tests.support.ports import free_port
from tests.support.receivers import SmtpReceiver, WebhookReceiver
from tests.support.tls import self_signed

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
                                    "in the last 15m (threshold: more than 1)"
                                    "\nRunbook: docs/runbooks/failed_runs.md"}
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
    assert mail.email["Subject"] == fired.text.splitlines()[0]  # the runbook line follows
    assert fired.text in mail.email.get_content().replace("\r\n", "\n")  # SMTP line ends


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
