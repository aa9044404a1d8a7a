"""An outage switch on the storage door, for in-process outage tests on either lane."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pymongo.errors import ServerSelectionTimeoutError

from mwapjobs.storage.mongo import Mongo

T = TypeVar("T")


class FlakyMongo(Mongo):
    """The storage door with an outage switch: every query fails while `down` is set,
    the way the driver fails when no server answers (the door sees a pymongo error)."""

    down = False
    attempts = 0

    async def call(self, op: Callable[[Any], Awaitable[T]]) -> T:
        if not self.down:
            return await super().call(op)
        self.attempts += 1

        def unreachable(db: Any) -> Awaitable[T]:
            raise ServerSelectionTimeoutError("injected outage: no servers available")

        return await super().call(unreachable)

    async def ping(self, timeout: float = 2.0) -> None:
        if self.down:
            self.attempts += 1
            raise ServerSelectionTimeoutError("injected outage: no servers available")
        await super().ping(timeout)


def flaky(mongo: Mongo) -> FlakyMongo:
    """The same handle (same clients and database), with the outage switch."""
    mongo.__class__ = FlakyMongo
    assert isinstance(mongo, FlakyMongo)
    return mongo
