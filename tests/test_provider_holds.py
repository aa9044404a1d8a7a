"""The provider-hold read cache (storage/providers.py): a read never outlives a write it
overlapped. Runs queued in a provider's slot trust the cached read, so a stale "not held"
kept after a hold was written sends one more request the hold should have stopped."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from bson import ObjectId

from mwapjobs.storage.mongo import Mongo
from mwapjobs.storage.providers import Problem, ProviderHolds

PROBLEM = Problem(error="invalid_client", reason="the client secret is wrong", http_status=401)


class SlowFirstRead:
    """A Mongo whose first call answers, then waits (a read on its way back) until let go."""

    def __init__(self, mongo: Mongo) -> None:
        self.mongo = mongo
        self.answered = asyncio.Event()
        self.let_go = asyncio.Event()
        self.first = True

    async def call(self, fn: Callable[[Any], Awaitable[Any]]) -> Any:
        first, self.first = self.first, False
        result = await self.mongo.call(fn)
        if first:
            self.answered.set()
            await self.let_go.wait()
        return result


async def test_a_read_that_overlapped_a_hold_is_not_kept(mongo: Mongo) -> None:
    slow = SlowFirstRead(mongo)
    holds = ProviderHolds(slow)  # type: ignore[arg-type]
    provider = {"_id": ObjectId(), "name": "Acme Drive", "clientId": "c"}
    pid = str(provider["_id"])
    reading = asyncio.create_task(holds.get(pid))
    await asyncio.wait_for(slow.answered.wait(), 5)  # read "not held", not back yet
    assert await holds.hold(provider, PROBLEM, datetime.now(UTC), 60.0) is True
    slow.let_go.set()
    assert await reading is None  # what was there when it read
    # The next look, even one that trusts any cached read, sees the hold.
    hold = await holds.get(pid, max_age=float("inf"))
    assert hold is not None and hold["error"] == "invalid_client"


async def test_reads_are_kept_between_writes(mongo: Mongo) -> None:
    """The cache still works: a second look within `cache_seconds` asks nobody."""
    calls = 0

    class Counting:
        async def call(self, fn: Callable[[Any], Awaitable[Any]]) -> Any:
            nonlocal calls
            calls += 1
            return await mongo.call(fn)

    holds = ProviderHolds(Counting())  # type: ignore[arg-type]
    pid = str(ObjectId())
    assert await holds.get(pid) is None
    assert await holds.get(pid) is None
    assert calls == 1
