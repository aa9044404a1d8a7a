"""Tenant-owner notifications: delivered through the channels and marked, retried with
backoff while a channel fails, delivered by the daemon in the background; and alerting
switched off."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, timedelta
from typing import Any

from mwapjobs.daemon import Daemon
from mwapjobs.storage.mongo import Mongo
from tests.conftest import make_settings, wait_for
from tests.support.alerting import WallClock, add_runs, manager, notifications, notify, registry
from tests.support.receivers import WebhookReceiver

# -- tenant-owner notifications --------------------------------------------------------------

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
