"""What the alerting tests share: an in-memory channel, hand-moved clocks, an alert
manager on the test's database, and runs and tenant notifications seeded directly.

- `RecordingChannel` (what it was sent; `fail` makes it raise), `Ticker` (monotonic),
  `WallClock` (wall time);
- `registry(*queues)`, `manager(mongo, registry, channels, alerts, ...)`;
- runs: `add_runs`, `clear_runs`; notifications: `notify` (one `integration.expired`),
  `notifications` (all, oldest first).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from bson import ObjectId

from mwapjobs.alerts import AlertManager, Message
from mwapjobs.queues import Job, QueueRegistry
from mwapjobs.storage.integrations import IntegrationStore
from mwapjobs.storage.mongo import Mongo
from mwapjobs.storage.names import NOTIFICATIONS, RUNS
from tests.conftest import make_settings
from tests.support.mwap_data import insert_all


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
    await insert_all(mongo, RUNS, docs)


async def clear_runs(mongo: Mongo, queue: str, state: str) -> None:
    await mongo.call(lambda db: db[RUNS].delete_many({"queue": queue, "state": state}))


async def notify(mongo: Mongo, reason: str = "invalid_grant: refresh token revoked") -> None:
    integration = {"_id": "65f000000000000000000001", "tenantId": "65f0000000000000000000aa",
                   "providerId": "65f0000000000000000000bb"}
    await IntegrationStore(mongo).notifications.record("integration.expired", integration,
                                                       reason, datetime.now(UTC))


async def notifications(mongo: Mongo) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = await mongo.call(
        lambda db: db[NOTIFICATIONS].find({}).sort("createdAt", 1).to_list(None))
    return docs
