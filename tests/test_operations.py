"""The operator API: stats, listing, retry, promote, remove, clean, redaction."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from bson import ObjectId

from mwapjobs.config import EngineSettings
from mwapjobs.engine import Engine
from mwapjobs.operations import REDACTED, ConflictError, NotFoundError, Operations
from mwapjobs.queues import Job, PermanentError, QueueRegistry
from mwapjobs.redaction import is_secret_key, redact
from mwapjobs.storage.mongo import Mongo
from mwapjobs.storage.names import RUNS
from tests.conftest import wait_for


class FakeClock:
    """Real time plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)


class Behaviour:
    """One handler whose outcome each job chooses with data["mode"]."""

    def __init__(self) -> None:
        self.calls: list[Job] = []
        self.release = asyncio.Event()
        self.fail_first: set[str] = set()

    async def __call__(self, job: Job) -> Any:
        self.calls.append(job)
        mode = job.data.get("mode", "ok")
        if mode == "fail":
            raise PermanentError("bad input")
        if mode == "fail-once" and job.run_id not in self.fail_first:
            self.fail_first.add(job.run_id)
            raise PermanentError("first time fails")
        if mode == "block":
            await self.release.wait()
        return job.data.get("result", "ok")

    def ran(self, run_id: str) -> int:
        return sum(1 for j in self.calls if j.run_id == run_id)


Setup = tuple[Engine, Operations, Behaviour, FakeClock]


@pytest.fixture
async def setup(mongo: Mongo) -> AsyncIterator[Setup]:
    behaviour = Behaviour()
    clock = FakeClock()
    reg = QueueRegistry()
    reg.register("q", behaviour, concurrency=1, attempts=1,
                 backoff={"delay": 0.1, "jitter": 0})
    reg.register("other", behaviour)
    engine = Engine(mongo, reg, EngineSettings(lease_seconds=2, sweep_interval=0.3),
                    clock=clock)
    await engine.start()
    try:
        yield engine, Operations(engine), behaviour, clock
    finally:
        behaviour.release.set()
        await engine.stop(2)


async def wait_state(ops: Operations, run_id: str, *states: str,
                     timeout: float = 10) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    async def reached() -> bool:
        seen["run"] = await ops.get_run(run_id)
        return seen["run"]["state"] in states

    await wait_for(reached, timeout=timeout, message=f"run {run_id} to become {states}")
    return seen["run"]


async def finished(engine: Engine, ops: Operations, data: dict[str, Any], state: str,
                   queue: str = "q") -> str:
    added = await engine.add(queue, data)
    # Settled as the engine says it (its write acknowledged, so counted), not as soon
    # as the stored state reads so, a moment before.
    run = await engine.wait_settled(added.run_id, 10)
    assert run is not None and run["state"] == state, run
    return added.run_id


async def count_docs(mongo: Mongo, query: dict[str, Any]) -> int:
    return int(await mongo.call(lambda db: db[RUNS].count_documents(query)))


# -- stats and listing -----------------------------------------------------------------------


async def test_stats_count_each_state(setup: Setup, mongo: Mongo) -> None:
    engine, ops, behaviour, _ = setup
    assert (await ops.stats())["q"] == {"waiting": 0, "active": 0, "delayed": 0, "completed": 0,
                                        "failed": 0, "paused": 0, "isPaused": False}
    await finished(engine, ops, {}, "completed")
    await finished(engine, ops, {"mode": "fail"}, "failed")
    blocker = await engine.add("q", {"mode": "block"})
    await wait_state(ops, blocker.run_id, "active")
    for _ in range(2):
        await engine.add("q", {})  # concurrency 1: these wait behind the blocker
    await engine.add("q", {}, delay=3600)
    await finished(engine, ops, {}, "completed", queue="other")

    stats = await ops.stats()
    assert stats["q"] == {"waiting": 2, "active": 1, "delayed": 1, "completed": 1,
                          "failed": 1, "paused": 0, "isPaused": False}
    assert stats["other"] == {"waiting": 0, "active": 0, "delayed": 0, "completed": 1,
                              "failed": 0, "paused": 0, "isPaused": False}
    for state in ("waiting", "active", "delayed", "completed", "failed"):
        assert stats["q"][state] == await count_docs(mongo, {"queue": "q", "state": state})

    await ops.pause("q")
    paused = (await ops.stats())["q"]
    assert (paused["waiting"], paused["paused"], paused["isPaused"]) == (0, 2, True)
    assert paused["active"] == 1 and paused["delayed"] == 1

    await ops.resume("q")
    behaviour.release.set()

    async def drained() -> bool:
        s = (await ops.stats())["q"]
        return s["completed"] == 4 and s["waiting"] == 0 and s["active"] == 0

    await wait_for(drained, timeout=5, message="the queue to drain")


async def test_list_runs_pages_and_orders(setup: Setup) -> None:
    engine, ops, _, clock = setup
    ids = []
    for i in range(5):
        ids.append(await finished(engine, ops, {"i": i}, "completed"))
        clock.advance(1)  # distinct finish times

    page1 = await ops.list_runs("q", "completed", page=1, page_size=2)
    assert (page1["page"], page1["pageSize"], page1["total"]) == (1, 2, 5)
    assert [r["runId"] for r in page1["items"]] == [ids[4], ids[3]]  # newest first
    page3 = await ops.list_runs("q", "completed", page=3, page_size=2)
    assert [r["runId"] for r in page3["items"]] == [ids[0]]
    assert page3["total"] == 5
    page4 = await ops.list_runs("q", "completed", page=4, page_size=2)
    assert page4["items"] == [] and page4["total"] == 5
    everything = await ops.list_runs("q", "completed")
    assert [r["runId"] for r in everything["items"]] == ids[::-1]
    assert (everything["page"], everything["pageSize"]) == (1, 20)

    empty = await ops.list_runs("q", "failed")
    assert empty["items"] == [] and empty["total"] == 0


async def test_list_runs_orders_pending_runs_as_they_will_run(setup: Setup) -> None:
    engine, ops, _, clock = setup
    await ops.pause("q")
    low = (await engine.add("q", {}, priority=0)).run_id
    clock.advance(1)
    high = (await engine.add("q", {}, priority=9)).run_id
    clock.advance(1)
    low_later = (await engine.add("q", {}, priority=0)).run_id
    listed = await ops.list_runs("q", "waiting")
    assert [r["runId"] for r in listed["items"]] == [high, low, low_later]
    assert listed["total"] == 3

    later = (await engine.add("q", {}, delay=7200)).run_id
    sooner = (await engine.add("q", {}, delay=3600)).run_id
    delayed = await ops.list_runs("q", "delayed")
    assert [r["runId"] for r in delayed["items"]] == [sooner, later]


async def test_list_runs_rejects_bad_arguments(setup: Setup) -> None:
    _, ops, _, _ = setup
    with pytest.raises(ValueError, match="state must be one of"):
        await ops.list_runs("q", "running")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pageSize between 1 and 200"):
        await ops.list_runs("q", "waiting", page_size=0)
    with pytest.raises(ValueError, match="pageSize"):
        await ops.list_runs("q", "waiting", page_size=201)
    with pytest.raises(ValueError, match="page must be >= 1"):
        await ops.list_runs("q", "waiting", page=0)
    with pytest.raises(NotFoundError, match="no queue named 'nope'"):
        await ops.list_runs("nope", "waiting")
    assert (await ops.list_runs("q", "waiting", page_size=200))["pageSize"] == 200


async def test_get_run(setup: Setup) -> None:
    engine, ops, _, _ = setup
    run_id = await finished(engine, ops, {"result": {"n": 1}, "x": 2}, "completed")
    view = await ops.get_run(run_id)
    assert view["runId"] == run_id
    assert view["queue"] == "q"
    assert view["state"] == "completed"
    assert view["data"] == {"result": {"n": 1}, "x": 2}
    assert view["result"] == {"n": 1}
    assert view["attemptsMade"] == 1 and view["maxAttempts"] == 1
    assert len(view["attempts"]) == 1
    assert "_id" not in view and "leaseOwner" not in view

    with pytest.raises(NotFoundError):
        await ops.get_run(str(ObjectId()))
    with pytest.raises(NotFoundError, match="no run with id 'not-an-id'"):
        await ops.get_run("not-an-id")
    with pytest.raises(NotFoundError):
        await ops.get_run("")


# -- actions ---------------------------------------------------------------------------------------


async def test_retry_a_failed_run(setup: Setup) -> None:
    engine, ops, behaviour, _ = setup
    added = await engine.add("q", {"mode": "fail-once"}, job_id="j1")
    failed = await wait_state(ops, added.run_id, "failed")
    assert failed["error"]["message"] == "first time fails"

    retried = await ops.retry(added.run_id)
    assert retried["runId"] == added.run_id
    assert retried["state"] in ("waiting", "active", "completed")
    assert retried["error"] is None
    done = await wait_state(ops, added.run_id, "completed")
    assert behaviour.ran(added.run_id) == 2
    assert done["attemptsMade"] == 1  # a fresh set of attempts
    assert [a["outcome"] for a in done["attempts"]] == ["failed", "completed"]
    assert done["error"] is None
    # While re-pending it held the job id; once completed the id is free again.
    again = await engine.add("q", {}, job_id="j1")
    assert again.created is True


async def test_retry_refuses_runs_that_did_not_fail(setup: Setup) -> None:
    engine, ops, _, _ = setup
    completed = await finished(engine, ops, {}, "completed")
    with pytest.raises(ConflictError, match="only failed runs can be retried"):
        await ops.retry(completed)
    delayed = (await engine.add("q", {}, delay=3600)).run_id
    with pytest.raises(ConflictError, match="this one is delayed"):
        await ops.retry(delayed)
    with pytest.raises(NotFoundError):
        await ops.retry(str(ObjectId()))
    assert (await ops.get_run(completed))["state"] == "completed"


async def test_retry_conflicts_with_a_pending_run_of_the_same_job_id(setup: Setup) -> None:
    engine, ops, _, _ = setup
    first = await engine.add("q", {"mode": "fail"}, job_id="dup")
    await wait_state(ops, first.run_id, "failed")
    pending = await engine.add("q", {}, job_id="dup", delay=3600)
    assert pending.created is True
    with pytest.raises(ConflictError, match="already pending"):
        await ops.retry(first.run_id)
    assert (await ops.get_run(first.run_id))["state"] == "failed"


async def test_promote_a_delayed_run(setup: Setup, mongo: Mongo) -> None:
    engine, ops, behaviour, _ = setup
    added = await engine.add("q", {}, delay=3600)
    promoted = await ops.promote(added.run_id)
    assert promoted["state"] in ("waiting", "active", "completed")
    done = await wait_state(ops, added.run_id, "completed", timeout=3)
    assert behaviour.ran(added.run_id) == 1
    assert done["attempts"][0]["startedAt"] < done["createdAt"] + timedelta(seconds=60)
    # The due timer still knows the old time; waking then finds nothing left to run.
    engine.wake()
    await engine.sweep()
    assert behaviour.ran(added.run_id) == 1

    with pytest.raises(ConflictError, match="only delayed runs can be promoted"):
        await ops.promote(added.run_id)


async def test_remove_runs_that_are_not_running(setup: Setup, mongo: Mongo) -> None:
    engine, ops, behaviour, _ = setup
    failed = await finished(engine, ops, {"mode": "fail"}, "failed")
    blocker = (await engine.add("q", {"mode": "block"})).run_id
    await wait_state(ops, blocker, "active")
    waiting = (await engine.add("q", {})).run_id
    delayed = (await engine.add("q", {}, delay=3600, job_id="later")).run_id

    for run_id, state in ((waiting, "waiting"), (delayed, "delayed"), (failed, "failed")):
        removed = await ops.remove(run_id)
        assert (removed["runId"], removed["state"]) == (run_id, state)
        with pytest.raises(NotFoundError):
            await ops.get_run(run_id)
    assert (await engine.add("q", {}, delay=3600, job_id="later")).created is True

    with pytest.raises(ConflictError, match="active runs cannot be removed"):
        await ops.remove(blocker)
    assert (await ops.get_run(blocker))["state"] == "active"
    with pytest.raises(NotFoundError):
        await ops.remove(str(ObjectId()))

    behaviour.release.set()
    await wait_state(ops, blocker, "completed")
    assert behaviour.ran(waiting) == 0


async def test_clean_deletes_only_older_finished_runs(setup: Setup) -> None:
    engine, ops, _, clock = setup
    old = [await finished(engine, ops, {}, "completed") for _ in range(2)]
    old_failed = await finished(engine, ops, {"mode": "fail"}, "failed")
    clock.advance(100)
    recent = await finished(engine, ops, {}, "completed")

    assert await ops.clean("q", "completed", older_than=50) == 2
    for run_id in old:
        with pytest.raises(NotFoundError):
            await ops.get_run(run_id)
    assert (await ops.get_run(recent))["state"] == "completed"
    assert (await ops.get_run(old_failed))["state"] == "failed"  # another state
    assert await ops.clean("q", "completed", older_than=50) == 0

    assert await ops.clean("q", "failed", older_than=50) == 1
    with pytest.raises(ValueError, match="only completed or failed"):
        await ops.clean("q", "waiting", older_than=0)
    with pytest.raises(ValueError, match="olderThan must be >= 0"):
        await ops.clean("q", "completed", older_than=-1)
    with pytest.raises(NotFoundError):
        await ops.clean("nope", "completed", older_than=0)
    assert await ops.clean("q", "completed", older_than=0) == 1


async def test_pause_and_resume_unknown_queue(setup: Setup) -> None:
    _, ops, _, _ = setup
    with pytest.raises(NotFoundError):
        await ops.pause("nope")
    with pytest.raises(NotFoundError):
        await ops.resume("nope")
    with pytest.raises(NotFoundError):
        await ops.repeats("nope")


# -- redaction -------------------------------------------------------------------------------------


SECRET_DATA = {"accessToken": "x", "nested": {"client_secret": "y", "keep": "z"},
               "items": [{"password": "p"}], "tenant": "t1"}
SHOWN = {"accessToken": REDACTED, "nested": {"client_secret": REDACTED, "keep": "z"},
         "items": [{"password": REDACTED}], "tenant": "t1"}


async def test_secrets_are_redacted_in_views_but_not_for_the_handler(setup: Setup,
                                                                    mongo: Mongo) -> None:
    engine, ops, behaviour, _ = setup
    added = await engine.add("q", {**SECRET_DATA, "result": {"refreshToken": "r", "ok": 1}})
    view = await wait_state(ops, added.run_id, "completed")
    assert view["data"] == {**SHOWN, "result": {"refreshToken": REDACTED, "ok": 1}}
    assert view["result"] == {"refreshToken": REDACTED, "ok": 1}
    listed = await ops.list_runs("q", "completed")
    assert listed["items"][0]["data"]["accessToken"] == REDACTED
    assert listed["items"][0]["data"]["nested"]["client_secret"] == REDACTED

    # Only the views are masked: the handler and the database have the real values.
    [job] = behaviour.calls
    assert job.data["accessToken"] == "x"
    assert job.data["nested"]["client_secret"] == "y"
    raw = await mongo.call(lambda db: db[RUNS].find_one({"_id": ObjectId(added.run_id)}))
    assert raw["data"]["accessToken"] == "x"


async def test_secrets_are_redacted_in_repeat_views(setup: Setup) -> None:
    engine, ops, _, _ = setup
    await engine.repeat("q", SECRET_DATA, every=3600, job_id="sync")
    [view] = await ops.repeats()
    assert view["data"] == SHOWN
    assert view["jobId"] == "sync"
    assert view["schedule"] == "every 3600s"
    assert view["timezone"] == "UTC"


@pytest.mark.parametrize(("key", "secret"), [
    ("accessToken", True), ("refresh_token", True), ("client_secret", True),
    ("clientSecret", True), ("password", True), ("SMTP_PASS", True), ("Authorization", True),
    ("cookie", True), ("apiKey", True), ("X-Api-Key", True), ("privateKey", True),
    ("credentials", True), ("csrfToken", True), ("tokens", True),
    ("tokenExpiresAt", False), ("tokenUrl", False), ("tokenMethod", False),
    ("secretName", False), ("key", False), ("jobKey", False), ("integrationId", False),
    ("tenant", False), ("", False), (3, False),
])
def test_secret_looking_keys_are_judged_by_their_last_word(key: object, secret: bool) -> None:
    assert is_secret_key(key) is secret


def test_redact_masks_values_at_any_depth_but_keeps_none_and_booleans() -> None:
    data = {"integrationId": "i1", "tokenExpiresAt": "2026-12-01T10:00:00+00:00",
            "auth": {"refreshToken": {"value": "r", "rotated": True}, "hasToken": True,
                     "accessToken": None},
            "attempts": ({"error": {"client_secret": 42}},)}
    assert redact(data) == {
        "integrationId": "i1", "tokenExpiresAt": "2026-12-01T10:00:00+00:00",
        "auth": {"refreshToken": REDACTED, "hasToken": True, "accessToken": None},
        "attempts": [{"error": {"client_secret": REDACTED}}]}
    assert data["auth"]["refreshToken"] == {"value": "r", "rotated": True}  # a copy
