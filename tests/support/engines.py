"""What the queue-engine tests share: engines on the test's database (mongomock by
default), APScheduler as the clock, and ways to watch runs.

Every timing check uses small intervals (backoff 0.1-0.4 s, leases of 1-2 s,
sweeps every 0.2-0.3 s) or an injected clock, and waits on conditions rather
than fixed sleeps.

- fixture: `make_engine` (build, and by default start, engines; all stopped at teardown);
  a test module binds it as its own: `make_engine = engines.make_engine`;
- `registry(handler, ...)`: a registry with one queue `q`; `FakeClock`, `Events`;
- reading runs: `doc`, `wait_state`, `all_runs`, `scheduler_jobs`, `seconds`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from bson import ObjectId

from mwapjobs.config import EngineSettings
from mwapjobs.engine import Engine, utcnow
from mwapjobs.queues import Job, QueueRegistry
from mwapjobs.storage.mongo import Mongo
from mwapjobs.storage.names import RUNS, SCHEDULER_JOBS
from tests.conftest import TEST_SIGNING_KEY, wait_for

Handler = Callable[[Job], Awaitable[Any]]
MakeEngine = Callable[..., Awaitable[Engine]]
TOLERANCE = 0.01  # seconds: MongoDB keeps milliseconds, timers are not exact to the microsecond


class FakeClock:
    """Real time plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)


class Events:
    """A listener that records every event."""

    def __init__(self) -> None:
        self.items: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, event: str, run: dict[str, Any]) -> None:
        self.items.append((event, run))

    def names(self, run_id: str | None = None) -> list[str]:
        return [e for e, r in self.items if run_id is None or r.get("runId") == run_id]

    def of(self, name: str) -> list[dict[str, Any]]:
        return [r for e, r in self.items if e == name]


def registry(handler: Handler, name: str = "q", **options: Any) -> QueueRegistry:
    reg = QueueRegistry()
    defaults: dict[str, Any] = {"backoff": {"delay": 0.1, "jitter": 0}, "attempts": 3,
                                "concurrency": 2}
    reg.register(name, handler, **{**defaults, **options})
    return reg


@pytest.fixture
async def make_engine(mongo: Mongo) -> AsyncIterator[MakeEngine]:
    """Build (and by default start) engines; every one is stopped at teardown."""
    engines: list[Engine] = []

    async def make(reg: QueueRegistry, *, clock: Callable[[], datetime] = utcnow,
                   start: bool = True, **settings: Any) -> Engine:
        options = {"lease_seconds": 2, "sweep_interval": 0.3, **settings}
        engine = Engine(mongo, reg, EngineSettings(**options), clock=clock,
                        signing_key=TEST_SIGNING_KEY)
        engines.append(engine)
        if start:
            await engine.start()
        return engine

    yield make
    for engine in engines:
        await engine.stop(1)


async def doc(engine: Engine, run_id: str) -> dict[str, Any]:
    found = await engine.runs.get(ObjectId(run_id))
    assert found is not None, f"run {run_id} does not exist"
    return found


async def wait_state(engine: Engine, run_id: str, *states: str,
                     timeout: float = 10) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    async def reached() -> bool:
        seen["doc"] = await doc(engine, run_id)
        return seen["doc"]["state"] in states

    await wait_for(reached, timeout=timeout, message=f"run {run_id} to become {states}")
    return seen["doc"]


async def all_runs(mongo: Mongo, query: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return await mongo.call(lambda db: db[RUNS].find(query or {}).to_list(None))


async def scheduler_jobs(mongo: Mongo) -> list[dict[str, Any]]:
    """APScheduler's stored triggers: only repeats have one, delayed runs none."""
    return await mongo.call(lambda db: db[SCHEDULER_JOBS].find({}).to_list(None))


def seconds(a: datetime, b: datetime) -> float:
    """b - a in seconds."""
    return (b - a).total_seconds()
