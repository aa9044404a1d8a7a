"""The embedded store's query thread (storage/mongo.py `_QueryThread`): queries run
there, in order, one at a time; answers and errors reach their callers; a query whose
caller gave up is not run; closing cancels what is queued; a query that suspends is
refused."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import mongomock
import pytest

from mwapjobs.storage.mongo import Mongo
from tests.conftest import wait_for


@pytest.fixture
async def embedded() -> Any:
    mongo = Mongo.from_clients(mongomock.MongoClient(tz_aware=True))
    yield mongo
    mongo.close()


def blocking(gate: threading.Event, ran: list[str], name: str) -> Any:
    async def op(db: Any) -> str:
        ran.append(f"{name} started")
        gate.wait(10)  # holds the query thread (a long query)
        ran.append(name)
        return name
    return op


async def test_queries_run_in_order_on_their_own_thread(embedded: Mongo) -> None:
    threads: list[str] = []

    async def where(db: Any) -> int:
        threads.append(threading.current_thread().name)
        return len(threads)

    answers = await asyncio.gather(*(embedded.call(where) for _ in range(20)))
    assert answers == list(range(1, 21))
    assert set(threads) == {"mwapjobs-embedded-db"}
    await embedded.call(lambda db: db["c"].insert_one({"_id": 1}))
    assert await embedded.call(lambda db: db["c"].find_one({"_id": 1})) == {"_id": 1}
    with pytest.raises(mongomock.DuplicateKeyError):
        await embedded.call(lambda db: db["c"].insert_one({"_id": 1}))


async def test_a_query_whose_caller_gave_up_is_not_run(embedded: Mongo) -> None:
    gate, ran = threading.Event(), []
    first = asyncio.ensure_future(embedded.call(blocking(gate, ran, "first")))
    second = asyncio.ensure_future(embedded.call(blocking(gate, ran, "second")))
    third = asyncio.ensure_future(embedded.call(blocking(gate, ran, "third")))
    await wait_for(lambda: ran == ["first started"], message="the first query to run")
    second.cancel()  # while it waits in line
    gate.set()
    assert await first == "first" and await third == "third"
    assert second.cancelled() and ran == ["first started", "first", "third started", "third"]


async def test_closing_cancels_the_queued_queries(embedded: Mongo) -> None:
    gate, ran = threading.Event(), []
    running = asyncio.ensure_future(embedded.call(blocking(gate, ran, "running")))
    queued = [asyncio.ensure_future(embedded.call(blocking(gate, ran, f"q{i}")))
              for i in range(3)]
    await wait_for(lambda: ran == ["running started"], message="the first query to run")
    closing = asyncio.ensure_future(asyncio.to_thread(embedded.close))
    queries = embedded._queries
    assert queries is not None
    await wait_for(lambda: queries._stopping, message="the close to begin")
    gate.set()
    await asyncio.wait_for(closing, 10)
    assert await asyncio.wait_for(running, 5) == "running"  # it had started: it ends
    for task in queued:
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
    assert ran == ["running started", "running"]
    with pytest.raises(RuntimeError, match="closed"):
        await embedded.call(lambda db: db["c"].find_one({}))


async def test_a_query_that_suspends_is_refused_and_the_thread_goes_on(
        embedded: Mongo) -> None:
    async def suspends(db: Any) -> None:
        await asyncio.sleep(0)  # a bare yield: nothing on that thread resumes it

    with pytest.raises(RuntimeError, match="suspended"):
        await embedded.call(suspends)
    assert await embedded.call(lambda db: db["c"].count_documents({})) == 0
