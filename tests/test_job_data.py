"""A job type declares the data it needs: bad data is refused at add time, clearly."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from bson import ObjectId
from pydantic import BaseModel, Field

from mwapjobs.config import ConfigError, EngineSettings
from mwapjobs.daemon import Daemon
from mwapjobs.engine import Engine, utcnow
from mwapjobs.jobs import demo
from mwapjobs.queues import InvalidJobData, Job, QueueRegistry
from mwapjobs.storage.mongo import Mongo
from mwapjobs.storage.names import RUNS
from tests.conftest import make_settings, wait_for

TOKEN = "mwj_job-data-token"


class Needs(BaseModel):
    integrationId: str = Field(pattern=r"^[0-9a-f]{24}$")


async def test_the_engine_refuses_data_its_job_type_does_not_accept(mongo: Mongo) -> None:
    ran: list[dict[str, Any]] = []

    async def handler(job: Job) -> None:
        ran.append(job.data)

    reg = QueueRegistry()
    reg.register("q", handler, data=Needs, attempts=3)
    engine = Engine(mongo, reg, EngineSettings(lease_seconds=2, sweep_interval=0.2))
    await engine.start()
    try:
        with pytest.raises(InvalidJobData, match=r"data\.integrationId: Field required"):
            await engine.add("q", {})
        with pytest.raises(InvalidJobData, match=r"data\.integrationId: String should match"):
            await engine.add("q", {"integrationId": "nope"})
        assert await mongo.call(lambda db: db[RUNS].count_documents({})) == 0

        # Data that got in some other way fails for good, once, with the reason.
        bad = ObjectId()
        now = utcnow()
        await mongo.call(lambda db: db[RUNS].insert_one({
            "_id": bad, "queue": "q", "jobId": None, "data": {"integrationId": 42},
            "state": "waiting", "priority": 0, "runAt": now, "attemptsMade": 0,
            "maxAttempts": 3, "backoff": {}, "timeout": 30.0, "deadline": None,
            "createdAt": now, "attempts": []}))
        engine.wake("q")

        async def failed() -> bool:
            run = await engine.runs.get(bad)
            return run is not None and run["state"] == "failed"

        await wait_for(failed, message="the bad run to fail")
        run = await engine.runs.get(bad)
        assert run is not None
        assert run["error"]["permanent"] is True
        assert "data.integrationId" in run["error"]["message"]
        assert len(run["attempts"]) == 1 and ran == []
    finally:
        await engine.stop(1)


@pytest.fixture
async def daemon(mongo: Mongo) -> AsyncIterator[Daemon]:
    settings = make_settings(admin={"tokens": [
        {"name": "ops", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}]})
    d = Daemon(settings, mongo=mongo)
    demo.add_queue(d.registry)
    await d.start()
    await d.wait_ready()
    yield d
    await d.stop()


async def post_job(d: Daemon, queue: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.post(
            f"http://127.0.0.1:{d.port}/api/v1/queues/{queue}/jobs", json=body,
            headers={"Authorization": f"Bearer {TOKEN}"}) as r:
        return r.status, await r.json()


@pytest.mark.parametrize(("data", "field"), [
    ({"seconds": "soon"}, "data.seconds"),
    ({"seconds": -1}, "data.seconds"),
    ({"succeed_on": 0}, "data.succeed_on"),
])
async def test_bad_job_data_is_a_400_naming_the_field(daemon: Daemon, data: dict[str, Any],
                                                      field: str) -> None:
    status, body = await post_job(daemon, "demo", {"data": data})
    assert status == 400, body
    assert body["success"] is False
    assert field in body["error"]["message"]
    status, body = await post_job(daemon, "demo", {"data": {"seconds": 0}})
    assert status == 201, body


async def test_an_unknown_queue_section_stops_the_start(mongo: Mongo) -> None:
    d = Daemon(make_settings(queues={"tokn-refresh": {"attempts": 5}}), mongo=mongo)
    with pytest.raises(ConfigError, match=r"^queues\.tokn-refresh: no such queue"):
        await d.start()
    ok = Daemon(make_settings(queues={"token-refresh": {"attempts": 5}}), mongo=mongo)
    await ok.start()
    await ok.stop()


def test_a_typo_in_a_queue_section_stops_serve_with_exit_2(tmp_path: Any) -> None:
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT, TEST_ENCRYPTION_KEY

    config = tmp_path / "config.toml"
    config.write_text('[queues.tokn-refresh]\nattempts = 5\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("MWAPJOBS_")}
    env.update(MONGODB_URI="memory://", ENCRYPTION_KEY=TEST_ENCRYPTION_KEY,
               MWAPJOBS_HTTP__PORT="0")
    out = subprocess.run([sys.executable, "-m", "mwapjobs", "serve", "--config", str(config)],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(
        "mwapjobs: config error: queues.tokn-refresh: no such queue")
    assert "Traceback" not in out.stderr
