"""Follow the backend's writes within a second: change streams for discovery.

Where the server has change streams (a replica set, Atlas), the leader follows
`cloudProviderIntegrations` and `cloudProviders` and hands each batch of changes to
discovery's own code, so there is one set of decisions whoever asks:
- integrations named by a change (added, reconnected, refreshed, revoked, deleted):
  `RefreshSync.sync_integrations`, the decisions of a pass for just those. An update
  that writes neither `refreshToken` nor `tokenExpiresAt` (a status write, most often
  our own after a refresh that failed) may drop a run but adds none: what keeps
  failing is retried at the pace of the polling pass, not of the stream;
- providers named by a change: `RefreshSync.sync_providers` (what a full pass does for
  a provider: lift a hold of a changed provider, notice a new token or API URL; and
  the refresher's copy of it is read again).

The polling loop stays, at `refresh.sync_interval` with a full pass every
`FULL_EVERY`: the safety net for what a stream cannot tell (a run deleted by hand, an
access token that expires with no refresh token, a stream that was down).

Where there are no change streams (a standalone server, the embedded store, a user
without the privilege) discovery only polls, and the server is asked again every
`RECHECK` s (the embedded store never). `mode` says which runs (`/readyz`: `discovery`),
and the log says so when it changes. `refresh.follow_changes = false` turns following
off (polling only).

Resuming. Each collection's resume token is kept in `mwapjobs_change_streams`: saved when
a stream opens, after each batch of changes is handled (so a change is handled at least
once: a crash in between replays it, and discovery's decisions are idempotent), every
`SAVE_EVERY` s while nothing changes, and when the stream closes. A new stream (after a
restart, a network error, a new leader) resumes from it; when the server refuses it
(its history left the oplog) or the stream ended (the collection was dropped), the
token is forgotten, a new stream opens from now, and then discovery makes one catch-up
pass (a full one; for providers, the provider part of one), so nothing written before
the new stream falls between.

Changes are read by one task and handled by another: a burst is taken as one batch
(one re-read of the documents, one reconciliation), and a slow batch never stops the
reading. Only the leader follows (leader-only tasks): losing the lease cancels them,
and each stream is then closed (its cursor killed on the server) before they end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any, Literal

from ...leadership import Leadership
from ...storage.changes import (
    Change,
    ChangeFeeds,
    ChangeStream,
    ChangeStreamLost,
    ChangeStreamsUnavailable,
    ResumeTokenRefused,
)
from ...storage.mongo import StoreUnavailable
from ...storage.names import INTEGRATIONS, PROVIDERS
from ...supervisor import FailureLog
from ...timeouts import within
from .discovery import RefreshSync, SyncReport, log_report

log = logging.getLogger(__name__)

MAX_AWAIT = 0.5  # s a getMore waits on the server for a change (and a close, for a getMore)
SAVE_EVERY = 10.0  # s between saves of the resume token while nothing changes
RECHECK = 600.0  # s between asking a server without change streams again
MAX_QUEUED = 10_000  # changes read and not yet handled; the reader waits beyond that
SAVE_ON_CLOSE_TIMEOUT = 2.0
REOPEN_MAX_BACKOFF = 30.0
# An integration's update that writes none of these (a status, metadata) adds no run:
# the tokens a run is for (`runs.connection_fingerprint`).
TOKEN_FIELDS = ("refreshToken", "tokenExpiresAt")

Mode = Literal["change-stream", "polling", "off"]
Token = dict[str, Any]


@dataclass
class Followed:
    """One followed collection: what handles its changes, and where its stream is."""

    collection: str
    # The changed documents' ids, and (as str) those whose changes left `fields` alone.
    handle: Callable[[list[Any], set[str]], Awaitable[SyncReport]]
    catch_up: Callable[[], Awaitable[SyncReport]]  # after a start without a resume point
    fields: tuple[str, ...] = ()  # whose updates the events tell apart
    open: bool = False
    why: str | None = None  # why it has no stream, when it has none
    handled: Token | None = None  # the token past the last batch handled
    saved: Token | None = None
    saved_at: float = field(default=0.0)


@dataclass(frozen=True)
class Batch:
    keys: list[Any]  # the documents to reconcile, each once, in the order first named
    untouched: set[str]  # (as str) those none of whose changes wrote the watched fields
    ended: str | None = None  # the event that ended the stream, if one did


def batch(changes: list[Change]) -> Batch:
    """What a batch of changes asks of discovery: the documents to reconcile (whatever
    the operation: discovery re-reads them, and a deleted one is missing), which of
    them kept their tokens, and whether the stream ended (what follows that event is
    not of this stream). I/O-free."""
    keys: dict[str, Any] = {}
    wrote: set[str] = set()
    ended = None
    for change in changes:
        if change.ends_stream:
            ended = change.kind
            break
        if change.key is not None:
            keys.setdefault(repr(change.key), change.key)
            if change.writes_fields:
                wrote.add(repr(change.key))
    return Batch(list(keys.values()),
                 {str(key) for name, key in keys.items() if name not in wrote}, ended)


class ChangeFollower:
    """The leader's change streams, one task per followed collection (see the module)."""

    def __init__(self, discovery: RefreshSync, feeds: ChangeFeeds,
                 clock: Callable[[], datetime], leading: Callable[[], bool], *,
                 max_await: float = MAX_AWAIT, save_every: float = SAVE_EVERY,
                 recheck: float = RECHECK) -> None:
        self.feeds = feeds
        self.clock = clock
        self._leading = leading
        self.max_await = max_await
        self.save_every = save_every
        self.recheck = recheck
        self.interval = discovery.settings.sync_interval
        self.enabled = discovery.settings.follow_changes
        self.followed = {
            INTEGRATIONS: Followed(INTEGRATIONS, discovery.sync_integrations,
                                   partial(discovery.sync_once, True), TOKEN_FIELDS),
            PROVIDERS: Followed(PROVIDERS,
                                lambda keys, _: discovery.sync_providers({str(k) for k in keys}),
                                partial(discovery.sync_providers, None)),
        }
        self._logged: Mode | None = None

    def register(self, leadership: Leadership) -> None:
        """Follow each collection while this instance leads."""
        for name in self.followed:
            leadership.keep(f"refresh:follow:{name}", partial(self.follow, name),
                            message="following changes crashed; restarting it")

    @property
    def mode(self) -> Mode:
        """How discovery learns of the backend's writes on this instance: "off" when it
        does not lead (or refresh is off), "change-stream" while every followed
        collection has an open stream, else "polling"."""
        if not self._leading():
            return "off"
        return "change-stream" if all(f.open for f in self.followed.values()) else "polling"

    async def follow(self, name: str) -> None:
        """Follow one collection until cancelled (the leader-only task). After a network
        error or a lost stream it opens a new one from the stored token, after 0.5 s,
        doubling up to REOPEN_MAX_BACKOFF while it keeps failing."""
        followed = self.followed[name]
        if not self.enabled:
            self._state(followed, False, "turned off (refresh.follow_changes = false)")
            return
        failures = FailureLog(log, "change stream failed; reopening it", collection=name)
        while True:
            try:
                stream = await self._open(followed)
            except ChangeStreamsUnavailable as exc:
                self._state(followed, False, str(exc))
                if self.feeds.available is not None:
                    return  # the embedded store: never
                await asyncio.sleep(self.recheck)
                continue
            except (StoreUnavailable, ChangeStreamLost) as exc:
                await self._failed(followed, failures, exc)
                continue
            failures.succeeded()
            error: Exception | None = None
            try:
                self._state(followed, True)
                await self._pump(followed, stream)  # returns when the stream ended
            except (StoreUnavailable, ChangeStreamLost) as exc:
                error = exc
            finally:
                self._state(followed, False, "the stream closed")
                await self._close(followed, stream)
            if error is not None:
                await self._failed(followed, failures, error)

    async def _failed(self, followed: Followed, failures: FailureLog,
                      exc: Exception) -> None:
        failures.failed(exc)
        self._state(followed, False, f"{type(exc).__name__}: {exc}"[:300])
        await asyncio.sleep(min(REOPEN_MAX_BACKOFF, 0.5 * 2 ** min(failures.failures - 1, 10)))

    # -- opening and closing ---------------------------------------------------------

    async def _open(self, followed: Followed) -> ChangeStream:
        name = followed.collection
        token = await self.feeds.saved_token(name)
        if token is not None:
            try:
                stream = await self.feeds.open(name, token, self.max_await, followed.fields)
            except ResumeTokenRefused as exc:
                log.warning("the change stream cannot resume from its stored token; a new "
                            "one, and a full discovery pass", extra={
                                "collection": name, "error": str(exc)})
                await self.feeds.forget_token(name)
            else:
                followed.handled = followed.saved = token
                log.info("following changes with a change stream", extra={
                    "collection": name, "resumed": True})
                return stream
        stream = await self.feeds.open(name, None, self.max_await, followed.fields)
        try:
            followed.handled = stream.token
            await self._save(followed)
            # Now that the stream is open, a pass sees what was written before it.
            log_report(await followed.catch_up())
        except BaseException:
            await stream.close()
            raise
        log.info("following changes with a change stream", extra={
            "collection": name, "resumed": False})
        return stream

    async def _close(self, followed: Followed, stream: ChangeStream) -> None:
        await stream.close()
        if followed.handled is not None and followed.handled != followed.saved:
            with contextlib.suppress(Exception):  # replayed from the older one: harmless
                await within(self._save(followed), SAVE_ON_CLOSE_TIMEOUT)

    async def _save(self, followed: Followed) -> None:
        token = followed.handled
        if token is None:
            return
        await self.feeds.save_token(followed.collection, token, self.clock())
        followed.saved, followed.saved_at = token, time.monotonic()

    # -- reading and handling ----------------------------------------------------------

    async def _pump(self, followed: Followed, stream: ChangeStream) -> None:
        queue: asyncio.Queue[tuple[Change | None, Token | None]] = asyncio.Queue(MAX_QUEUED)
        reader = asyncio.ensure_future(self._read(stream, queue))
        handler = asyncio.ensure_future(self._handle(followed, queue))
        try:
            done, _ = await asyncio.wait({reader, handler},
                                         return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in (reader, handler):
                task.cancel()
            await asyncio.gather(reader, handler, return_exceptions=True)
        for task in done:
            task.result()  # raises what failed

    async def _read(self, stream: ChangeStream,
                    queue: asyncio.Queue[tuple[Change | None, Token | None]]) -> None:
        while True:
            asked = time.monotonic()
            change, token = await stream.next()
            await queue.put((change, token))
            if change is not None and change.ends_stream:
                return
            if change is None:  # a server that does not wait for changes is not hammered
                await asyncio.sleep(max(0.0, self.max_await / 2 - (time.monotonic() - asked)))

    async def _handle(self, followed: Followed,
                      queue: asyncio.Queue[tuple[Change | None, Token | None]]) -> None:
        while True:
            items = [await queue.get()]
            while not queue.empty():
                items.append(queue.get_nowait())
            found = batch([change for change, _ in items if change is not None])
            if found.keys:
                log_report(await followed.handle(found.keys, found.untouched))
            if found.ended is not None:
                log.warning("the change stream ended; a new one, and a full discovery pass",
                            extra={"collection": followed.collection, "event": found.ended})
                await self.feeds.forget_token(followed.collection)
                followed.handled = followed.saved = None
                return
            followed.handled = items[-1][1] or followed.handled
            if followed.handled != followed.saved and (
                    found.keys or time.monotonic() - followed.saved_at >= self.save_every):
                await self._save(followed)

    # -- what runs, said once --------------------------------------------------------------

    def _state(self, followed: Followed, is_open: bool, why: str | None = None) -> None:
        """Record whether a stream is open, and log the mode when it changes (once every
        followed collection has opened, or said why not)."""
        followed.open, followed.why = is_open, (None if is_open else why)
        mode = self.mode
        if mode == "off":  # no longer leading: said again at the next leadership
            self._logged = None
            for other in self.followed.values():
                other.why = None
            return
        if mode == self._logged or any(not f.open and f.why is None
                                       for f in self.followed.values()):
            return
        self._logged = mode
        if mode == "change-stream":
            log.info("discovery follows the backend's writes with change streams", extra={
                "mode": mode, "pollEvery": self.interval})
        else:
            log.info("discovery polls: no change streams", extra={
                "mode": mode, "pollEvery": self.interval,
                "why": {f.collection: f.why for f in self.followed.values() if f.why}})
