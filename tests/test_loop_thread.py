"""No synchronous MongoDB call ever runs on the event loop's thread.

Every method through which a query reaches the database is wrapped to record the
thread it runs on: mongomock's collection and cursor (the embedded store, which
is also what APScheduler's job store talks to in tests) and pymongo's (under a
real server, with MWAPJOBS_TEST_MONGODB_URI). A full engine lifecycle is then
driven through `Engine` and `Operations`; not one recorded call may come from the
loop's thread. A control test proves the wrappers do see a call made on it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from functools import wraps
from typing import Any

import mongomock
import mongomock.collection
import pymongo.synchronous.collection
import pymongo.synchronous.command_cursor
import pymongo.synchronous.cursor
import pytest
from apscheduler.jobstores.mongodb import MongoDBJobStore
from bson import ObjectId

from mwapjobs.config import EngineSettings
from mwapjobs.engine import Engine, utcnow
from mwapjobs.operations import Operations
from mwapjobs.queues import Job, PermanentError, QueueRegistry
from mwapjobs.storage.mongo import Mongo
from tests.conftest import wait_for

MONGOMOCK_COLLECTION = [
    "insert_one", "insert_many", "find", "find_one", "update_one", "update_many",
    "replace_one", "delete_one", "delete_many", "find_one_and_update", "find_one_and_delete",
    "find_one_and_replace", "count_documents", "estimated_document_count", "create_index",
    "create_indexes", "aggregate", "distinct", "bulk_write", "list_indexes",
    "index_information", "drop", "_iter_documents",
]
MONGOMOCK_CURSOR = ["__next__", "_compute_results"]
# pymongo's find()/aggregate() only build a cursor; the I/O happens in _refresh.
PYMONGO_COLLECTION = [m for m in MONGOMOCK_COLLECTION
                      if m not in ("find", "aggregate", "_iter_documents")]
PYMONGO_CURSOR = ["_refresh", "next"]
JOBSTORE = ["start", "lookup_job", "get_due_jobs", "get_next_run_time", "get_all_jobs",
            "add_job", "update_job", "remove_job", "remove_all_jobs", "_get_jobs", "shutdown"]


@dataclass(frozen=True)
class Call:
    where: str
    thread: int
    thread_name: str


class Recorder:
    def __init__(self) -> None:
        self.db: list[Call] = []
        self.jobstore: list[Call] = []
        self._lock = threading.Lock()

    def wrap(self, monkeypatch: pytest.MonkeyPatch, cls: type, names: list[str],
             into: list[Call]) -> None:
        for name in names:
            original = cls.__dict__.get(name)
            if original is None or not callable(original):
                continue
            monkeypatch.setattr(cls, name, self._recording(original, f"{cls.__name__}.{name}",
                                                           into))

    def _recording(self, fn: Callable[..., Any], where: str,
                   into: list[Call]) -> Callable[..., Any]:
        @wraps(fn)
        def recorded(*args: Any, **kwargs: Any) -> Any:
            current = threading.current_thread()
            with self._lock:
                into.append(Call(where, threading.get_ident(), current.name))
            return fn(*args, **kwargs)

        return recorded

    def on(self, thread: int, calls: list[Call]) -> list[Call]:
        return [c for c in calls if c.thread == thread]


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    rec = Recorder()
    rec.wrap(monkeypatch, mongomock.collection.Collection, MONGOMOCK_COLLECTION, rec.db)
    rec.wrap(monkeypatch, mongomock.collection.Cursor, MONGOMOCK_CURSOR, rec.db)
    rec.wrap(monkeypatch, pymongo.synchronous.collection.Collection, PYMONGO_COLLECTION, rec.db)
    rec.wrap(monkeypatch, pymongo.synchronous.cursor.Cursor, PYMONGO_CURSOR, rec.db)
    rec.wrap(monkeypatch, pymongo.synchronous.command_cursor.CommandCursor, PYMONGO_CURSOR,
             rec.db)
    rec.wrap(monkeypatch, MongoDBJobStore, JOBSTORE, rec.jobstore)
    yield rec


def test_the_wrappers_see_a_call_on_the_current_thread(recorder: Recorder) -> None:
    """Control: without this, an empty or broken instrumentation would pass the real test."""
    collection = mongomock.MongoClient().db.c
    collection.insert_one({"a": 1})
    assert list(collection.find({"a": 1}))
    me = threading.get_ident()
    seen = {c.where for c in recorder.on(me, recorder.db)}
    assert {"Collection.insert_one", "Collection.find", "Cursor.__next__"} <= seen


class Behaviour:
    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.failed_once: set[str] = set()

    async def __call__(self, job: Job) -> Any:
        mode = job.data.get("mode", "ok")
        if mode == "fail":
            raise PermanentError("no")
        if mode == "retry-once" and job.run_id not in self.failed_once:
            self.failed_once.add(job.run_id)
            raise RuntimeError("once")
        if mode == "block":
            await self.release.wait()
        return {"ok": True}


async def test_no_sync_database_call_on_the_loop_thread(recorder: Recorder,
                                                        mongo: Mongo) -> None:
    loop_thread = threading.get_ident()
    behaviour = Behaviour()
    reg = QueueRegistry()
    reg.register("q", behaviour, concurrency=3, attempts=2,
                 backoff={"delay": 0.1, "jitter": 0})
    engine = Engine(mongo, reg, EngineSettings(lease_seconds=1, sweep_interval=0.2))
    ops = Operations(engine)

    async def state(run_id: str) -> str:
        return str((await ops.get_run(run_id))["state"])

    async def until(run_id: str, *states: str) -> None:
        async def reached() -> bool:
            return await state(run_id) in states
        await wait_for(reached, timeout=10, message=f"{run_id} -> {states}")

    try:
        # An orphan from a "dead" process: recovered by the sweep at start.
        orphan = ObjectId()
        now = utcnow()
        await engine.runs.insert({
            "_id": orphan, "queue": "q", "jobId": None, "data": {}, "state": "active",
            "priority": 0, "runAt": now, "attemptsMade": 1, "maxAttempts": 2,
            "backoff": {"delay": 0.1, "jitter": 0}, "timeout": 30.0, "deadline": None,
            "createdAt": now, "attempts": [], "leaseOwner": "dead:1:x",
            "leaseUntil": now - timedelta(minutes=1),
        })
        await engine.start()
        await until(str(orphan), "completed")

        plain = await engine.add("q", {})
        first = await engine.add("q", {}, job_id="dedupe", delay=0.2)
        again = await engine.add("q", {}, job_id="dedupe", delay=0.2)  # duplicate key path
        assert again.run_id == first.run_id and not again.created
        moved = await engine.add("q", {}, job_id="moved", delay=3600)
        await engine.add("q", {"v": 2}, job_id="moved", delay=3700, replace=True)
        to_remove = await engine.add("q", {}, delay=3600)
        retried = await engine.add("q", {"mode": "retry-once"})
        failing = await engine.add("q", {"mode": "fail"})
        for run_id in (plain.run_id, first.run_id, retried.run_id):
            await until(run_id, "completed")
        await until(failing.run_id, "failed")

        await ops.promote(moved.run_id)
        await until(moved.run_id, "completed")
        await ops.remove(to_remove.run_id)
        await ops.retry(failing.run_id)
        await until(failing.run_id, "failed")

        await engine.repeat("q", {"r": 1}, every=0.2, job_id="tick")
        await wait_for(lambda: _repeat_ran(ops), timeout=5, message="a repeat run")
        assert [r["jobId"] for r in await ops.repeats()] == ["tick"]
        assert await engine.remove_repeat("q", "tick") is True

        await ops.pause("q")
        await ops.stats()
        await ops.resume("q")
        await ops.list_runs("q", "completed", page=1, page_size=5)
        await ops.clean("q", "failed", older_than=3600)
        await engine.apply_retention()
        await engine._sweep()

        blocked = await engine.add("q", {"mode": "block"})
        await until(blocked.run_id, "active")
        await engine.stop(0.2)  # the drain times out: the run is handed back
        assert await state(blocked.run_id) == "waiting"
    finally:
        behaviour.release.set()
        await engine.stop(1)

    assert recorder.db, "the wrappers saw no database call at all"
    seen = {c.where.split(".")[1] for c in recorder.db}
    expected = {"insert_one", "update_many", "update_one", "find_one", "find_one_and_update",
                "find_one_and_delete", "count_documents", "create_index", "delete_many"}
    assert expected <= seen, f"not exercised: {expected - seen}"
    on_loop = recorder.on(loop_thread, recorder.db)
    assert on_loop == [], f"sync database calls on the event loop thread: {on_loop}"

    assert recorder.jobstore, "APScheduler's job store was never called"
    jobstore_seen = {c.where.split(".")[1] for c in recorder.jobstore}
    assert {"start", "add_job", "remove_job", "get_due_jobs", "_get_jobs"} <= jobstore_seen
    on_loop = recorder.on(loop_thread, recorder.jobstore)
    assert on_loop == [], f"job store calls on the event loop thread: {on_loop}"
    # Fires are found by APScheduler's own thread; our calls go through the io thread.
    threads = {c.thread_name for c in recorder.jobstore}
    assert "APScheduler" in threads
    assert any(name.startswith("mwapjobs-scheduler-io") for name in threads)


async def _repeat_ran(ops: Operations) -> bool:
    listed = await ops.list_runs("q", "completed", page_size=200)
    return any(r["jobId"] == "tick" for r in listed["items"])
