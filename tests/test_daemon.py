"""The daemon in-process: readiness, MongoDB outages and recovery, programmatic start."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import mongomock
import pytest

from mwapjobs.daemon import Daemon
from mwapjobs.queues import Job
from mwapjobs.storage.mongo import Mongo, StoreUnavailable
from tests.conftest import REAL_MONGODB_URI, make_settings, wait_for
from tests.support.flaky import FlakyMongo


async def readyz(daemon: Daemon) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, \
            http.get(f"http://127.0.0.1:{daemon.port}/readyz") as r:
        return r.status, await r.json()


async def healthz_status(daemon: Daemon) -> int:
    async with aiohttp.ClientSession() as http, \
            http.get(f"http://127.0.0.1:{daemon.port}/healthz") as r:
        return r.status


@pytest.mark.skipif(bool(REAL_MONGODB_URI), reason="injects an outage into the embedded store")
async def test_starts_not_ready_while_mongodb_is_down_then_recovers() -> None:
    mongo = FlakyMongo.from_clients(mongomock.MongoClient(tz_aware=True))
    mongo.down = True
    daemon = Daemon(make_settings(), mongo=mongo)
    ran: list[str] = []

    async def handler(job: Job) -> None:
        ran.append(job.data["n"])

    daemon.registry.register("q", handler)
    await daemon.start()
    try:
        status, body = await readyz(daemon)
        assert status == 503
        assert body["success"] is False
        assert "mongodb unreachable" in body["error"]["message"]
        assert "scheduler not running" in body["error"]["message"]
        assert await healthz_status(daemon) == 200  # alive, just not ready
        await wait_for(lambda: mongo.attempts >= 3, message="start-up retries")
        assert not daemon.engine.running

        mongo.down = False
        await daemon.wait_ready(timeout=10)
        await wait_for(lambda: _is_ready(daemon), message="ready after recovery")
        await daemon.engine.add("q", {"n": "after-recovery"})
        await wait_for(lambda: ran == ["after-recovery"], message="job runs after recovery")
    finally:
        await daemon.stop()
        mongo.close()


async def _is_ready(daemon: Daemon) -> bool:
    return (await readyz(daemon))[0] == 200


@pytest.mark.skipif(bool(REAL_MONGODB_URI), reason="injects an outage into the embedded store")
async def test_outage_after_start_reports_not_ready_and_work_resumes() -> None:
    mongo = FlakyMongo.from_clients(mongomock.MongoClient(tz_aware=True))
    daemon = Daemon(make_settings(), mongo=mongo)
    ran: list[int] = []

    async def handler(job: Job) -> None:
        ran.append(job.data["n"])

    daemon.registry.register("q", handler)
    await daemon.start()
    try:
        await daemon.wait_ready()
        await daemon.engine.add("q", {"n": 1})
        await wait_for(lambda: ran == [1], message="first job")

        mongo.down = True
        await wait_for(lambda: _not_ready(daemon), message="not ready during the outage")
        _, body = await readyz(daemon)
        assert "injected outage" in body["error"]["message"]
        assert await healthz_status(daemon) == 200
        with pytest.raises(StoreUnavailable, match="injected outage"):
            await daemon.engine.add("q", {"n": 2})

        mongo.down = False
        await wait_for(lambda: _is_ready(daemon), message="ready again")
        await daemon.engine.add("q", {"n": 3})
        await wait_for(lambda: ran == [1, 3], message="work resumes after the outage")
    finally:
        await daemon.stop()
        mongo.close()


async def _not_ready(daemon: Daemon) -> bool:
    return (await readyz(daemon))[0] == 503


async def test_programmatic_start_with_injected_client_runs_jobs(mongo: Mongo) -> None:
    daemon = Daemon(make_settings(), mongo=mongo)
    done = asyncio.Event()

    async def handler(job: Job) -> str:
        done.set()
        return "ok"

    daemon.registry.register("q", handler)
    await daemon.start()
    try:
        await daemon.wait_ready()
        assert daemon.port and daemon.port > 0
        added = await daemon.engine.add("q", {})
        await asyncio.wait_for(done.wait(), 5)
        await wait_for(lambda: _state(daemon, added.run_id, "completed"), message="completed")
    finally:
        await daemon.stop()
    assert daemon.not_ready_reasons()[0] == "shutting down"


async def _state(daemon: Daemon, run_id: str, state: str) -> bool:
    run = await daemon.operations.get_run(run_id)
    return bool(run["state"] == state)


async def test_stop_drains_running_jobs_within_the_timeout(mongo: Mongo) -> None:
    daemon = Daemon(make_settings(shutdown_timeout=5), mongo=mongo)
    started = asyncio.Event()

    async def handler(job: Job) -> str:
        started.set()
        await asyncio.sleep(0.5)
        return "finished"

    daemon.registry.register("q", handler)
    await daemon.start()
    await daemon.wait_ready()
    added = await daemon.engine.add("q", {})
    await asyncio.wait_for(started.wait(), 5)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await daemon.stop()
    assert loop.time() - t0 < 5
    run = await daemon.operations.get_run(added.run_id)
    assert run["state"] == "completed"
    assert run["result"] == "finished"
