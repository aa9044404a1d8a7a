"""No synchronous MongoDB call ever runs on the event loop's thread.

Every point through which a query reaches the database is wrapped to record the
thread it runs on:

- mongomock's collection and cursor (the embedded store, which is also what
  APScheduler's job store talks to in tests);
- under a real server (MWAPJOBS_TEST_MONGODB_URI), pymongo's connection: every
  byte a query sends or receives goes through `Connection.send_message` and
  `Connection.receive_message`, and every new socket through `Pool.connect`.
  Wrapping pymongo's `Collection` or `Cursor` would not do: motor binds those
  methods when it is imported, so its calls never meet a later monkeypatch. A
  connection's methods are looked up on each call, by pymongo itself.

A full engine lifecycle is then driven through `Engine` and `Operations`; not one
recorded call may come from the loop's thread. Control tests prove the wrappers
see a call made on the current thread (mongomock, pymongo) and motor's calls
made on its own threads, on both lanes: without a real server they talk to a
minimal wire-protocol server in this file.
"""

from __future__ import annotations

import asyncio
import socketserver
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import wraps
from typing import Any

import bson
import mongomock
import mongomock.collection
import pymongo
import pymongo.synchronous.pool
import pytest
from apscheduler.jobstores.mongodb import MongoDBJobStore
from bson import ObjectId
from motor.motor_asyncio import AsyncIOMotorClient

from mwapjobs.config import EngineSettings
from mwapjobs.engine import Engine, utcnow
from mwapjobs.operations import Operations
from mwapjobs.queues import Job, PermanentError, QueueRegistry
from mwapjobs.storage.jobstore import JobStore
from mwapjobs.storage.mongo import Mongo
from tests.conftest import REAL_MONGODB_URI, wait_for

MONGOMOCK_COLLECTION = [
    "insert_one", "insert_many", "find", "find_one", "update_one", "update_many",
    "replace_one", "delete_one", "delete_many", "find_one_and_update", "find_one_and_delete",
    "find_one_and_replace", "count_documents", "estimated_document_count", "create_index",
    "create_indexes", "aggregate", "distinct", "bulk_write", "list_indexes",
    "index_information", "drop", "_iter_documents",
]
MONGOMOCK_CURSOR = ["__next__", "_compute_results"]
JOBSTORE = ["start", "lookup_job", "get_due_jobs", "get_next_run_time", "get_all_jobs",
            "add_job", "update_job", "remove_job", "remove_all_jobs", "_get_jobs", "shutdown"]
OP_MSG, OP_COMPRESSED = 2013, 2012


@dataclass(frozen=True)
class Call:
    where: str
    op: str  # the method (mongomock, job store) or the command sent (pymongo's wire)
    thread: int
    thread_name: str


def command_name(message: bytes | memoryview) -> str:
    """The command an OP_MSG carries: the first key of its body (section kind 0)."""
    raw = bytes(message)
    (op_code,) = struct.unpack_from("<i", raw, 12)
    if op_code == OP_COMPRESSED:
        return "<compressed>"
    if op_code != OP_MSG or raw[20] != 0:
        return f"<opcode {op_code}>"
    return raw[26:raw.index(b"\0", 26)].decode()


def _named(name: str) -> Callable[..., str]:
    return lambda *_, **__: name


class Recorder:
    def __init__(self) -> None:
        self.db: list[Call] = []
        self.jobstore: list[Call] = []
        self._lock = threading.Lock()

    def wrap(self, monkeypatch: pytest.MonkeyPatch, cls: type, names: list[str],
             into: list[Call], op: Callable[..., str] | None = None) -> None:
        for name in names:
            original = cls.__dict__.get(name)
            assert callable(original), f"{cls.__name__}.{name} is gone: fix the instrumentation"
            monkeypatch.setattr(cls, name, self._recording(
                original, f"{cls.__name__}.{name}", into, op or _named(name)))

    def _recording(self, fn: Callable[..., Any], where: str, into: list[Call],
                   op: Callable[..., str]) -> Callable[..., Any]:
        @wraps(fn)
        def recorded(*args: Any, **kwargs: Any) -> Any:
            current = threading.current_thread()
            with self._lock:
                into.append(Call(where, op(*args, **kwargs), threading.get_ident(),
                                 current.name))
            return fn(*args, **kwargs)

        return recorded

    def on(self, thread: int, calls: list[Call]) -> list[Call]:
        return [c for c in calls if c.thread == thread]

    def wire(self) -> list[Call]:
        return [c for c in self.db if c.where.startswith(("Connection.", "Pool."))]


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    rec = Recorder()
    rec.wrap(monkeypatch, mongomock.collection.Collection, MONGOMOCK_COLLECTION, rec.db)
    rec.wrap(monkeypatch, mongomock.collection.Cursor, MONGOMOCK_CURSOR, rec.db)
    connection = pymongo.synchronous.pool.Connection
    rec.wrap(monkeypatch, connection, ["send_message"], rec.db,
             lambda _conn, message, *_: command_name(message))
    rec.wrap(monkeypatch, connection, ["receive_message"], rec.db, _named("reply"))
    rec.wrap(monkeypatch, pymongo.synchronous.pool.Pool, ["connect"], rec.db,
             _named("connect"))
    # Our job store (signed) overrides most methods; the rest are APScheduler's.
    ours = [name for name in JOBSTORE if name in JobStore.__dict__]
    rec.wrap(monkeypatch, JobStore, ours, rec.jobstore)
    rec.wrap(monkeypatch, MongoDBJobStore, [n for n in JOBSTORE if n not in ours],
             rec.jobstore)
    yield rec


# -- a minimal MongoDB for the controls when no real server is configured ---------------------


class _WireHandler(socketserver.BaseRequestHandler):
    server: FakeMongo

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.request.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def handle(self) -> None:
        while True:
            try:
                length, request_id, _, op_code = struct.unpack("<iiii", self._read(16))
                body = self._read(length - 16)
            except (EOFError, OSError):
                return
            if op_code != OP_MSG:
                return
            payload = struct.pack("<IB", 0, 0) + bson.encode(self.server.answer(body))
            header = struct.pack("<iiii", 16 + len(payload), 0, request_id, OP_MSG)
            self.request.sendall(header + payload)


class FakeMongo(socketserver.ThreadingTCPServer):
    """Answers OP_MSG hello, insert and find (everything inserted), and ok to the rest:
    enough for pymongo and motor to insert a document and read it back."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _WireHandler)
        self.docs: list[dict[str, Any]] = []
        self.uri = f"mongodb://127.0.0.1:{self.server_address[1]}/?directConnection=true"

    def answer(self, body: bytes) -> dict[str, Any]:
        command: dict[str, Any] = {}
        documents: list[dict[str, Any]] = []
        pos = 4  # after flagBits
        while pos < len(body):
            kind, (size,) = body[pos], struct.unpack_from("<i", body, pos + 1)
            if kind == 0:
                command = bson.decode(body[pos + 1:pos + 1 + size])
            else:  # a document sequence: size, identifier, documents
                start = body.index(b"\0", pos + 5) + 1
                documents += bson.decode_all(body[start:pos + 1 + size])
            pos += 1 + size
        name = next(iter(command)).lower()
        if name in ("hello", "ismaster"):
            return {"isWritablePrimary": True, "ismaster": True, "helloOk": True,
                    "maxWireVersion": 21, "minWireVersion": 0,
                    "maxBsonObjectSize": 16 * 1024 * 1024, "maxMessageSizeBytes": 48_000_000,
                    "maxWriteBatchSize": 100_000, "localTime": datetime.now(UTC),
                    "connectionId": 1, "ok": 1.0}
        if name == "insert":
            self.docs += documents
            return {"n": len(documents), "ok": 1.0}
        if name == "find":
            return {"cursor": {"id": bson.Int64(0), "firstBatch": self.docs,
                               "ns": f"{command['$db']}.{command['find']}"}, "ok": 1.0}
        return {"ok": 1.0}


@pytest.fixture
def wire_uri() -> Iterator[str]:
    """A MongoDB to talk to over the wire: the real one of the lane, else `FakeMongo`."""
    if REAL_MONGODB_URI:
        yield REAL_MONGODB_URI
        return
    server = FakeMongo()
    thread = threading.Thread(target=server.serve_forever, name="fake-mongo", daemon=True)
    thread.start()
    try:
        yield server.uri
    finally:
        server.shutdown()
        server.server_close()


def test_the_wrappers_see_a_mongomock_call_on_the_current_thread(recorder: Recorder) -> None:
    """Control: without this, an empty or broken instrumentation would pass the real test."""
    collection = mongomock.MongoClient().db.c
    collection.insert_one({"a": 1})
    assert list(collection.find({"a": 1}))
    me = threading.get_ident()
    seen = {c.where for c in recorder.on(me, recorder.db)}
    assert {"Collection.insert_one", "Collection.find", "Cursor.__next__"} <= seen


def test_the_wrappers_see_a_pymongo_call_on_the_current_thread(recorder: Recorder,
                                                               wire_uri: str) -> None:
    collection = pymongo.MongoClient(wire_uri, serverSelectionTimeoutMS=5000)
    try:
        c = collection["mwapjobs_loop_thread_control"]["c"]
        c.insert_one({"a": 1})
        assert c.find_one({"a": 1}) is not None
        c.drop()
    finally:
        collection.close()
    me = threading.get_ident()
    mine = recorder.on(me, recorder.wire())
    assert {("Connection.send_message", "insert"), ("Connection.send_message", "find"),
            ("Connection.receive_message", "reply")} <= {(c.where, c.op) for c in mine}


async def test_the_wrappers_see_motors_calls_on_its_own_threads(recorder: Recorder,
                                                                wire_uri: str) -> None:
    """What wrapping pymongo's Collection missed: motor's queries, run in motor's threads."""
    loop_thread = threading.get_ident()
    client: Any = AsyncIOMotorClient(wire_uri, serverSelectionTimeoutMS=5000)
    try:
        c = client["mwapjobs_loop_thread_control"]["motor"]
        await c.insert_one({"a": 1})
        assert await c.find_one({"a": 1}) is not None
        await c.drop()
    finally:
        # motor's close() is synchronous: it sends endSessions from the calling thread.
        await asyncio.to_thread(client.close)
    sent = {c.op for c in recorder.wire()
            if c.where == "Connection.send_message" and c.thread != loop_thread}
    assert {"insert", "find"} <= sent
    assert recorder.on(loop_thread, recorder.wire()) == []


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
        await engine.sweep()

        blocked = await engine.add("q", {"mode": "block"})
        await until(blocked.run_id, "active")
        await engine.stop(0.2)  # the drain times out: the run is handed back
        assert await state(blocked.run_id) == "waiting"
    finally:
        behaviour.release.set()
        await engine.stop(1)

    assert recorder.db, "the wrappers saw no database call at all"
    seen = {c.op for c in recorder.db}
    if REAL_MONGODB_URI:  # the commands motor and APScheduler's pymongo sent
        expected = {"insert", "update", "find", "findAndModify", "delete", "aggregate",
                    "createIndexes", "reply", "connect"}
    else:
        expected = {"insert_one", "update_many", "update_one", "find_one",
                    "find_one_and_update", "find_one_and_delete", "count_documents",
                    "create_index", "delete_many"}
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
