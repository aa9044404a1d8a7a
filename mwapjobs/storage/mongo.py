"""The one door to MongoDB: every database call in mwapjobs goes through `Mongo.call`.

Two clients are made from the same URI, as APScheduler needs a synchronous one:
- motor for the application's own queries, awaited on the event loop;
- pymongo for APScheduler's `MongoDBJobStore`, used only from the scheduler's thread.

`MONGODB_URI=memory://` swaps both for mongomock, sharing one in-memory
database. mongomock-motor runs every query synchronously on the calling
thread and mongomock scans whole collections, so for the embedded store
`call` runs each query on a dedicated thread (`_QueryThread`), the way a
database server would answer from another process. The loop that serves HTTP
never executes a query itself, embedded or not.

The door also knows whether the server answers: a query that fails for want of a
server (`pymongo.errors.ConnectionFailure`: no server selected, connection lost, a
socket timeout) marks it unreachable at once and raises `StoreUnavailable`, which
the API answers with 503; the next query or ping that succeeds marks it reachable.
State changes are logged once each, not per failed query.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import mongomock
import pymongo
from mongomock_motor import AsyncMongoMockClient
from motor.motor_asyncio import AsyncIOMotorClient
from pymongo.errors import ConnectionFailure
from pymongo.uri_parser import parse_uri

from ..timeouts import within
from .embedded import index_collection
from .names import (
    FILE_WALK,
    INTEGRATIONS,
    PROVIDERS,
    QUEUES,
    RUNS,
    SUPERADMINS,
    TENANTS,
    VIRTUAL_FILES,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

MEMORY_SCHEME = "memory://"
LOG_EVERY = 30.0  # seconds between "mongodb unreachable" lines while an outage lasts
DEFAULT_EMBEDDED_DB = "mwap"

# Our collections carry a prefix so that they stand apart from the backend's.
# The MWAP backend's collections, which we read and (for integrations) update.


# What the embedded store indexes (see embedded.py): the lookups the engine, discovery
# and the API make often, by equality on these fields, or by a date range in a group.
EMBEDDED_INDEXES: dict[str, tuple[list[tuple[str, ...]], list[tuple[tuple[str, ...], str]]]] = {
    # (No index on `claimToken` or `writeToken`: their reads also pin `_id`, and each
    # index costs every claim and outcome a little.)
    RUNS: ([("key",), ("slot",), ("jobId",)],
           [(("queue", "state"), "runAt"), (("state",), "runAt"),
            (("queue", "state"), "finishedAt")]),
    INTEGRATIONS: ([], [((), "updatedAt")]),
    PROVIDERS: ([], []),
    TENANTS: ([("ownerId",)], []),
    SUPERADMINS: ([("userId",)], []),
    QUEUES: ([], []),
    # The file index (storage/files.py): a project's documents, and those a full pass
    # did not see (a range on `syncStatus.lastSync`); other lookups are by `_id`. The
    # unique indexes' fields too: mongomock checks uniqueness with a query per write.
    VIRTUAL_FILES: ([("projectId",), ("providerFileId", "integrationId")],
                    [(("projectId",), "syncStatus.lastSync")]),
    FILE_WALK: ([("projectId",), ("projectId", "folderId")], []),
}
# The field a collection's pages sort by before one ordered index's date: a claim's
# (priority, runAt) page is then read in index order (see `HashIndexes.in_sort_order`).
EMBEDDED_PAGE_LEADS: dict[str, tuple[str, tuple[tuple[str, ...], str]]] = {
    RUNS: ("priority", (("queue", "state"), "runAt"))}
# The groups an ordered index keeps (by a field of its spec): a run's `runAt` is read
# while it waits, its `finishedAt` once it finished, so a claim or an outcome moves
# fewer entries (other groups' queries are answered by the hash index of the group).
EMBEDDED_ORDERED_ONLY: dict[str, dict[tuple[tuple[str, ...], str], tuple[str, tuple[str, ...]]]] = {
    RUNS: {(("queue", "state"), "runAt"): ("state", ("waiting", "delayed")),
           (("state",), "runAt"): ("state", ("waiting", "delayed")),
           (("queue", "state"), "finishedAt"): ("state", ("completed", "failed"))}}


class StoreUnavailable(Exception):
    """MongoDB did not answer; the message says why (never a credential)."""


class MongoUriError(ValueError):
    """The URI cannot be used (no database named, bad syntax)."""


def _describe(error: BaseException) -> str:
    """One line about a driver error; pymongo's texts name hosts, never credentials."""
    return f"{type(error).__name__}: {error}"[:300]


def database_name(uri: str) -> str:
    """The database is the URI's path, as in MWAP (`mongodb://host:27017/mwap`)."""
    if uri.startswith(MEMORY_SCHEME):
        return uri[len(MEMORY_SCHEME) :].strip("/") or DEFAULT_EMBEDDED_DB
    try:
        name = parse_uri(uri)["database"]
    except Exception as exc:  # pymongo raises several types for a bad URI
        raise MongoUriError(f"not a valid MongoDB URI: {type(exc).__name__}") from None
    if not name:
        raise MongoUriError("the URI names no database (e.g. mongodb://host:27017/mwap)")
    return str(name)


class _QueryThread:
    """The thread where the embedded store's (mongomock's) queries execute, one at a
    time, in the order they were asked.

    mongomock queries are pure-Python CPU work, so they must not run on the event
    loop's thread, and this thread competes with the loop for the GIL: a shorter switch
    interval (5 ms by default) hands the GIL back to the loop sooner; measured with
    bench/engine.py it cut the loop's worst stall during a burst from hundreds of ms to
    tens. mongomock-motor's coroutines never suspend (each wraps a synchronous call), so
    a query is run here by stepping its coroutine once, with no event loop on this
    thread: one there (a task per query, two wake-ups through its self-pipe) made a
    round trip cost about 300 µs of CPU, this a third of that. A query that does
    suspend is a bug, and fails with RuntimeError.
    """

    def __init__(self) -> None:
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
        self._queue: queue.SimpleQueue[_Query | None] = queue.SimpleQueue()
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="mwapjobs-embedded-db",
                                        daemon=True)
        self._thread.start()

    async def run(self, op: Callable[[Any], Awaitable[T]], db: Any) -> T:
        if self._stopping:
            raise RuntimeError("the database handle is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Query(op, db, future, loop))
        return await future

    def stop(self) -> None:
        """Stop the thread. Queries still queued are cancelled, so whoever awaits them
        gets CancelledError rather than waiting forever."""
        self._stopping = True
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=5)

    def _serve(self) -> None:
        while (query := self._queue.get()) is not None:
            if self._stopping:
                query.settle(None, asyncio.CancelledError())
            elif not query.future.cancelled():  # (its caller gave up before it ran)
                try:
                    value, error = _step(query.op(query.db)), None
                except BaseException as exc:
                    value, error = None, exc
                query.settle(value, error)
        while True:  # stopped: what came after the stop is cancelled too
            try:
                late = self._queue.get_nowait()
            except queue.Empty:
                return
            if late is not None:
                late.settle(None, asyncio.CancelledError())


@dataclass
class _Query:
    op: Callable[[Any], Awaitable[Any]]
    db: Any
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop

    def settle(self, value: Any, error: BaseException | None) -> None:
        """Hand the answer to the asking loop (from the query thread)."""
        with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
            self.loop.call_soon_threadsafe(_settle, self.future, value, error)


def _settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if isinstance(error, asyncio.CancelledError):
        future.cancel()
    elif error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


def _step(awaitable: Awaitable[T]) -> T:
    """The result of an awaitable that completes without suspending."""
    steps = awaitable.__await__()
    try:
        steps.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    steps.close()
    raise RuntimeError("an embedded-store query suspended; it may await only the store")


class Mongo:
    """A database handle for the app plus a factory of sync clients for APScheduler.

    Build it with `Mongo.connect(uri)` in production or `Mongo.from_clients(...)`
    to inject a client (tests, embedding). `round_trips` counts every query
    sent, which the benchmarks report per job.
    """

    def __init__(
        self,
        async_client: Any,
        db_name: str,
        jobstore_client: Callable[[], Any],
        *,
        embedded: bool,
    ) -> None:
        self.client = async_client
        self.db_name = db_name
        self.db = async_client[db_name]
        self.embedded = embedded
        self._jobstore_client = jobstore_client
        self._queries = _QueryThread() if embedded else None
        self.round_trips = 0
        self.closed = False
        # Reachability, as the last query or ping found it.
        self.reachable = False
        self.last_error: str | None = "not checked yet"
        self.down_since: float | None = time.monotonic()
        self._logged_down = -LOG_EVERY

    @classmethod
    def connect(
        cls, uri: str, server_selection_timeout: float = 5.0, db_name: str | None = None,
        socket_timeout: float = 30.0,
    ) -> Mongo:
        """Clients for `uri`; nothing is contacted until the first query.
        `db_name` overrides the URI's database (tests use a fresh one each).
        `socket_timeout` bounds how long a query waits for a server that stopped
        answering mid-way (a frozen server would otherwise hold it forever)."""
        name = db_name or database_name(uri)
        if uri.startswith(MEMORY_SCHEME):
            return cls.from_clients(mongomock.MongoClient(tz_aware=True), name)
        timeout_ms = int(server_selection_timeout * 1000)
        options: dict[str, Any] = {
            "serverSelectionTimeoutMS": timeout_ms,
            "connectTimeoutMS": timeout_ms,
            "socketTimeoutMS": int(socket_timeout * 1000),
            "tz_aware": True,
            "appname": "mwapjobs",
        }
        return cls(
            AsyncIOMotorClient(uri, **options),
            name,
            lambda: pymongo.MongoClient(uri, **options),
            embedded=False,
        )

    @classmethod
    def from_clients(
        cls, sync_client: Any, db_name: str = DEFAULT_EMBEDDED_DB, async_client: Any = None
    ) -> Mongo:
        """Wrap an existing client: a `mongomock.MongoClient` (embedded, shared with
        APScheduler), or a real pymongo client plus its motor twin."""
        if isinstance(sync_client, mongomock.MongoClient):
            for name, (specs, ordered) in EMBEDDED_INDEXES.items():
                index_collection(sync_client[db_name][name], specs, ordered,
                                 EMBEDDED_PAGE_LEADS.get(name),
                                 EMBEDDED_ORDERED_ONLY.get(name))
            shared: Any = AsyncMongoMockClient(mock_mongo_client=sync_client, tz_aware=True)
            return cls(shared, db_name, lambda: sync_client, embedded=True)
        if async_client is None:
            raise ValueError("a real pymongo client needs its motor twin as async_client")
        return cls(async_client, db_name, lambda: sync_client, embedded=False)

    async def call(self, op: Callable[[Any], Awaitable[T]]) -> T:
        """Run one query, `op(db)`, without ever executing it on the caller's loop thread."""
        if self.closed:
            raise RuntimeError("the database handle is closed")
        self.round_trips += 1
        try:
            if self._queries is not None:
                return await self._queries.run(op, self.db)
            result = await op(self.db)
        except ConnectionFailure as exc:
            self.mark_down(exc)
            raise StoreUnavailable(f"MongoDB unreachable: {_describe(exc)}") from None
        if not self.reachable:
            self.mark_up()
        return result

    async def ping(self, timeout: float = 2.0) -> None:
        """Check that the server answers within `timeout` seconds, and record it; raises
        StoreUnavailable if not. The embedded store lives in this process and always
        answers; asking it through the query thread would only measure how many
        queries wait in line before the ping (a burst of them made readiness flap)."""
        if self.closed:
            raise RuntimeError("the database handle is closed")
        if self.embedded:
            self.mark_up()
            return
        try:
            await within(self.call(lambda db: db.command("ping")), timeout)
        except TimeoutError:
            error = TimeoutError(f"no answer to a ping within {timeout:g}s")
            self.mark_down(error)
            raise StoreUnavailable(f"MongoDB unreachable: {_describe(error)}") from None
        except Exception as exc:
            if self.reachable:  # a failure the door did not record (an injected one)
                self.mark_down(exc)
            raise
        self.mark_up()

    def mark_up(self) -> None:
        if not self.reachable:
            log.info("mongodb reachable")
        self.reachable, self.last_error, self.down_since = True, None, None

    def mark_down(self, error: BaseException) -> None:
        """Record a failure; logged when it starts, then every LOG_EVERY s while it lasts."""
        message = _describe(error)
        now = time.monotonic()
        if self.reachable or now - self._logged_down >= LOG_EVERY:
            self._logged_down = now
            log.error("mongodb unreachable", extra={
                "error": message,
                "downSeconds": round(now - self.down_since, 1) if self.down_since else 0})
        if self.down_since is None:
            self.down_since = now
        self.reachable, self.last_error = False, message

    def jobstore_client(self) -> Any:
        """A sync client for APScheduler's job store. APScheduler closes it on shutdown,
        so each scheduler gets its own (the embedded one is shared: closing it is a no-op)."""
        return self._jobstore_client()

    def close(self) -> None:
        """Close the clients. Blocking (motor's close ends the server sessions from the
        calling thread): on the event loop, await `aclose` instead."""
        self.closed = True
        if self._queries is not None:
            self._queries.stop()
        else:
            self.client.close()

    async def aclose(self) -> None:
        """`close`, off the event loop's thread."""
        await asyncio.to_thread(self.close)
