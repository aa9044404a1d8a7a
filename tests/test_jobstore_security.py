"""Nothing planted in the scheduler's collection runs: unsigned, forged or foreign pickles
are never unpickled, and end up in the quarantine, reported."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import pickle
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from bson import Binary

from mwapjobs.config import EngineSettings
from mwapjobs.engine import Engine
from mwapjobs.operations import Operations
from mwapjobs.queues import Job, QueueRegistry
from mwapjobs.storage.mongo import Mongo
from mwapjobs.storage.names import SCHEDULER_JOBS, SCHEDULER_QUARANTINE
from tests.conftest import TEST_SIGNING_KEY, wait_for


class Payload:
    """What an attacker plants: unpickling it runs a command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def planted(marker: Path, job_id: str, sig: str | None = None,
            key: bytes | None = None) -> dict[str, Any]:
    state = pickle.dumps({"version": 1, "id": job_id, "func": "mwapjobs.scheduler:fire",
                          "trigger": Payload(marker), "kwargs": {}})
    doc: dict[str, Any] = {"_id": job_id, "next_run_time": 0.0, "job_state": Binary(state)}
    if key is not None:
        sig = hmac.new(key, job_id.encode() + b"\0" + state, hashlib.sha256).hexdigest()
    if sig is not None:
        doc["sig"] = sig
    return doc


@pytest.fixture
async def engine(mongo: Mongo) -> AsyncIterator[Engine]:
    async def handler(job: Job) -> None:
        return None

    reg = QueueRegistry()
    reg.register("q", handler)
    e = Engine(mongo, reg, EngineSettings(lease_seconds=2, sweep_interval=0.2),
               signing_key=TEST_SIGNING_KEY)
    yield e
    await e.stop(1)


@pytest.mark.parametrize("kind", ["unsigned", "forged", "signed-with-the-key-but-not-a-trigger",
                                  "signed-with-another-key"])
async def test_a_planted_pickle_never_runs(engine: Engine, mongo: Mongo, tmp_path: Path,
                                           kind: str, caplog: pytest.LogCaptureFixture) -> None:
    marker = tmp_path / "pwned"
    job_id = f"repeat:q:{kind}"
    doc = {
        "unsigned": lambda: planted(marker, job_id),
        "forged": lambda: planted(marker, job_id, sig="0" * 64),
        # Someone who has the key still cannot make it unpickle anything but a trigger.
        "signed-with-the-key-but-not-a-trigger": lambda: planted(marker, job_id,
                                                                 key=TEST_SIGNING_KEY),
        "signed-with-another-key": lambda: planted(marker, job_id, key=b"k" * 32),
    }[kind]()
    await mongo.call(lambda db: db[SCHEDULER_JOBS].insert_one(doc))
    caplog.set_level(logging.ERROR)
    await engine.start()  # the clock finds it due at once
    await engine.repeat("q", every=0.2, job_id="tick")  # a real one keeps working

    async def quarantined() -> bool:
        return await mongo.call(lambda db: db[SCHEDULER_QUARANTINE].count_documents({})) == 1

    await wait_for(quarantined, timeout=10, message="the planted document quarantined")
    listed = await Operations(engine).repeats()  # what the dashboard polls
    assert [r["jobId"] for r in listed] == ["tick"]
    assert not marker.exists()
    [moved] = await mongo.call(lambda db: db[SCHEDULER_QUARANTINE].find({}).to_list(None))
    assert moved["jobId"] == job_id and moved["reason"]
    assert await mongo.call(lambda db: db[SCHEDULER_JOBS].find_one({"_id": job_id})) is None
    assert any("scheduler document rejected" in r.getMessage() for r in caplog.records)
    assert engine.scheduler.healthy


async def test_signed_triggers_survive_a_restart(mongo: Mongo) -> None:
    fired: list[str] = []

    async def handler(job: Job) -> None:
        fired.append(job.run_id)

    def make() -> Engine:
        reg = QueueRegistry()
        reg.register("q", handler)
        return Engine(mongo, reg, EngineSettings(lease_seconds=2, sweep_interval=0.2),
                      signing_key=TEST_SIGNING_KEY)

    first = make()
    await first.start()
    await first.repeat("q", every=3600, job_id="hourly")
    [before] = await Operations(first).repeats()
    await first.stop(1)
    second = make()
    await second.start()
    try:
        [after] = await Operations(second).repeats()
        assert after["nextRunAt"] == before["nextRunAt"]  # read back, not rebuilt
        assert await mongo.call(lambda db: db[SCHEDULER_QUARANTINE].count_documents({})) == 0
    finally:
        await second.stop(1)
