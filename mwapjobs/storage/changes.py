"""Change streams on the backend's collections, and where we keep our place in them.

Discovery follows `cloudProviderIntegrations` and `cloudProviders` with a change
stream where the server has them (a replica set, Atlas; jobs/refresh/follow.py). This
is the only code that speaks to the server about it:

- `ChangeFeeds.open(collection, resume_after)` opens a stream and makes its first round
  trip at once, so what stops it is known then: `ChangeStreamsUnavailable` (a standalone
  server answers code 40573; the embedded store has none; a user without the
  `changeStream` privilege is refused) or `ResumeTokenRefused` (the stored position
  is no longer in the oplog, code 286, or the server cannot read it);
- `ChangeStream.next()` waits up to `max_await` s for the next change: `(change, token)`,
  the change or None, and the resume token just past it. A stream that fails later
  raises `ChangeStreamLost` (or `StoreUnavailable`, through the door, for a network
  error the driver could not resume from by itself);
- resume tokens are kept in `mwapjobs_change_streams`, one document per followed
  collection: `{_id: "<collection>", token: {_data: "…"}, savedAt}`.

The events are projected down to their resume token, `operationType`, `documentKey`
and whether an update touched the fields the caller named (compared on the server):
no document (and no encrypted token) crosses the wire; whoever follows re-reads what
it needs, which also covers deletions (they carry only the `_id`).

Every round trip goes through `Mongo.call`, on motor's threads: nothing blocks the event
loop. `ChangeStream.close()` lets a `getMore` in flight come back (at most `max_await`
s) before it kills the server's cursor, so a stop or a lost leadership leaves nothing
open behind.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pymongo.errors import OperationFailure

from .mongo import Mongo, StoreUnavailable
from .names import CHANGE_STREAMS

# Events after which the stream is over (the collection was dropped or renamed).
ENDING = frozenset({"drop", "rename", "dropDatabase", "invalidate"})
CLOSE_GRACE = 5.0  # s beyond `max_await` that close() waits for a getMore in flight


def projection(fields: Sequence[str]) -> list[dict[str, Any]]:
    """What each event keeps: its `_id` (the resume token, kept unless projected out),
    `operationType`, `documentKey`, and `touched`: did an update set or remove one of
    `fields` (the names only are compared on the server; no value is sent)."""
    touched: list[Any] = [False]
    for name in fields:
        touched.append({"$ne": [{"$type": f"$updateDescription.updatedFields.{name}"},
                                "missing"]})
        touched.append({"$in": [name, {"$ifNull": ["$updateDescription.removedFields", []]}]})
    return [{"$project": {"operationType": 1, "documentKey": 1,
                          "touched": {"$or": touched}}}]


class ChangeStreamsUnavailable(Exception):
    """This server (or this user) offers no change streams: poll instead."""


class ResumeTokenRefused(Exception):
    """The server cannot resume from the stored token (its history is gone)."""


class ChangeStreamLost(Exception):
    """An open stream failed in a way the driver did not resume from."""


@dataclass(frozen=True)
class Change:
    kind: str  # insert, update, replace, delete; or one of ENDING
    key: Any  # the document's `_id`, as stored (None for a collection-wide event)
    touched: bool = False  # an update that set or removed one of the fields asked for

    @property
    def writes_fields(self) -> bool:
        """Could the asked-for fields be new: an insert or a replace writes them all."""
        return self.touched or self.kind in ("insert", "replace")

    @property
    def ends_stream(self) -> bool:
        return self.kind in ENDING


def _describe(exc: BaseException) -> str:
    """The server's own message and code, without the whole reply."""
    details = getattr(exc, "details", None)
    message = details.get("errmsg") if isinstance(details, dict) else None
    return f"code {getattr(exc, 'code', None)}: {message or exc}"[:300]


class ChangeStream:
    """One open change stream of one collection (from `ChangeFeeds.open`)."""

    def __init__(self, mongo: Mongo, collection: str, stream: Any, max_await: float,
                 first: dict[str, Any] | None) -> None:
        self._mongo = mongo
        self.collection = collection
        self._stream = stream
        self._max_await = max_await
        self._first = first  # the change the opening round trip brought back, if any
        self._inflight: asyncio.Future[Any] | None = None
        self.closed = False

    @property
    def token(self) -> dict[str, Any] | None:
        """Where the stream stands: past the last change returned, or where the server
        got to while nothing changed."""
        token: dict[str, Any] | None = self._stream.resume_token
        return token

    async def next(self) -> tuple[Change | None, dict[str, Any] | None]:
        """The next change (None after `max_await` s without one), and the resume token
        just past it."""
        if self._first is not None:
            event, self._first = self._first, None
            return _change(event), event["_id"]
        if self.closed:
            raise ChangeStreamLost("the change stream is closed")
        inflight = asyncio.ensure_future(self._mongo.call(lambda db: self._stream.try_next()))
        self._inflight = inflight
        try:
            # Shielded: a cancelled caller leaves the getMore to finish (close waits for it).
            event = await asyncio.shield(inflight)
        except OperationFailure as exc:
            raise ChangeStreamLost(_describe(exc)) from None
        finally:
            if inflight.done():
                self._inflight = None
        if event is None:
            return None, self.token
        return _change(event), event["_id"]

    async def close(self) -> None:
        """Kill the server's cursor, once a getMore in flight has come back."""
        if self.closed:
            return
        self.closed = True
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            await asyncio.wait({inflight}, timeout=self._max_await + CLOSE_GRACE)
            if not inflight.done():
                inflight.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await inflight  # retrieved: no "exception never retrieved"
        with contextlib.suppress(Exception):  # the server drops an idle cursor itself
            await self._mongo.call(lambda db: self._stream.close())


def _change(event: dict[str, Any]) -> Change:
    key = (event.get("documentKey") or {}).get("_id")
    return Change(str(event.get("operationType")), key, event.get("touched") is True)


class ChangeFeeds:
    """Opens change streams, and keeps their resume tokens in `mwapjobs_change_streams`."""

    def __init__(self, mongo: Mongo) -> None:
        self._mongo = mongo

    @property
    def available(self) -> str | None:
        """None, or why there cannot be change streams (without asking the server)."""
        return "the embedded store has no change streams" if self._mongo.embedded else None

    async def open(self, collection: str, resume_after: dict[str, Any] | None,
                   max_await: float, fields: Sequence[str] = ()) -> ChangeStream:
        """A stream of `collection`'s changes after `resume_after` (from now when None),
        opened on the server; each update says whether it touched one of `fields`.
        Raises ChangeStreamsUnavailable, ResumeTokenRefused, or StoreUnavailable (the
        server did not answer: try again later)."""
        why = self.available
        if why is not None:
            raise ChangeStreamsUnavailable(why)
        opened: list[Any] = []

        async def first(db: Any) -> dict[str, Any] | None:
            stream = db[collection].watch(projection(fields), resume_after=resume_after,
                                          max_await_time_ms=max(1, int(max_await * 1000)))
            opened.append(stream)
            event: dict[str, Any] | None = await stream.try_next()  # runs the aggregate
            return event

        try:
            event = await self._mongo.call(first)
        except OperationFailure as exc:
            if opened:
                with contextlib.suppress(Exception):
                    await self._mongo.call(lambda db: opened[0].close())
            if resume_after is not None:
                raise ResumeTokenRefused(_describe(exc)) from None
            raise ChangeStreamsUnavailable(_describe(exc)) from None
        except StoreUnavailable:
            raise
        except (NotImplementedError, AttributeError) as exc:  # a client without `watch`
            raise ChangeStreamsUnavailable(f"{type(exc).__name__}: {exc}"[:300]) from None
        return ChangeStream(self._mongo, collection, opened[0], max_await, event)

    # -- resume tokens ------------------------------------------------------------------

    async def saved_token(self, collection: str) -> dict[str, Any] | None:
        doc: dict[str, Any] | None = await self._mongo.call(
            lambda db: db[CHANGE_STREAMS].find_one({"_id": collection}, {"token": 1}))
        token = doc.get("token") if doc else None
        return token if isinstance(token, dict) else None

    async def save_token(self, collection: str, token: dict[str, Any], now: datetime) -> None:
        await self._mongo.call(lambda db: db[CHANGE_STREAMS].update_one(
            {"_id": collection}, {"$set": {"token": token, "savedAt": now}}, upsert=True))

    async def forget_token(self, collection: str) -> None:
        await self._mongo.call(lambda db: db[CHANGE_STREAMS].delete_one({"_id": collection}))
