"""One timer for every delayed run: wake a queue's worker when its runs fall due.

Delayed runs have no trigger of their own. The engine keeps the due times it
knows in memory, sorted, and one asyncio timer armed at the earliest; when it
fires, the queues whose runs are due are woken, told how many fell due, and their
workers claim them (a claim takes due delayed runs directly). Adding a delayed run is therefore one
insert and, at most, moving that one timer: no trigger, no thread, no query.

What it knows comes from two places: the runs this process adds or reschedules
(`note`), and pages of future due runs read from the runs collection in
(`runAt`, `_id`) order (`load`), so that runs written before a restart are woken
too. The invariant: every delayed run due at or before the cursor is in `_due`
(or was woken). When the timer reaches the cursor, the next page is read.
Memory is bounded: beyond `cap` entries the latest are dropped and the cursor
moves back before them; they are read again when their time comes. A stale
entry (a run promoted, removed or moved meanwhile) costs one empty claim.

Runs that were already due at start, and runs another process added and then
died without claiming, are the engine sweep's business (it promotes due runs
every `engine.sweep_interval`).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from sortedcontainers import SortedList

log = logging.getLogger(__name__)

# load(after, limit): the due times and queues of up to `limit` delayed runs after the cursor
# `after` = (runAt, _id) in that order (with `_id` None: from that runAt on, inclusive);
# each item is (runAt, _id, queue).
Load = Callable[[tuple[datetime, Any], int], Awaitable[list[tuple[datetime, Any, str]]]]
RETRY_SECONDS = 5.0


class DueTimer:
    def __init__(self, wake: Callable[[dict[str, int]], None], load: Load,
                 now: Callable[[], datetime], *, cap: int = 200_000, page: int = 1000) -> None:
        self._wake = wake
        self._load = load
        self._now = now
        self._cap = cap
        self._page = page
        self._due: SortedList[tuple[float, str]] = SortedList()
        self._cursor: tuple[datetime, Any] | None = None  # read up to here (inclusive)
        self._cursor_ts = -math.inf
        self._handle: asyncio.TimerHandle | None = None
        self._armed_at = math.inf
        self._reading: asyncio.Task[None] | None = None
        self._running = False

    def start(self) -> None:
        """Start from now: read the first page of future due runs, then follow them."""
        self._running = True
        now = self._now()
        self._cursor, self._cursor_ts = (now, None), now.timestamp()
        self._read()

    def stop(self) -> None:
        self._running = False
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._reading is not None:
            self._reading.cancel()
            self._reading = None

    def __len__(self) -> int:
        return len(self._due)

    def note(self, when: datetime, queue: str) -> None:
        """A delayed run of `queue` falls due at `when`."""
        ts = when.timestamp()
        if ts > self._cursor_ts:
            return  # past what we track: the page that covers it is read when we get there
        self._due.add((ts, queue))
        self._trim()
        if ts < self._armed_at:
            self._arm()

    def _trim(self) -> None:
        while len(self._due) > self._cap:
            dropped, _ = self._due.pop()
            # Everything at or after `dropped` is read again from the database.
            self._cursor = (datetime.fromtimestamp(dropped, self._now().tzinfo), None)
            self._cursor_ts = dropped - 1e-6

    def _arm(self) -> None:
        if not self._running or self._reading is not None:
            return
        target = min(self._due[0][0] if self._due else math.inf, self._cursor_ts)
        if target == self._armed_at and self._handle is not None:
            return
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._armed_at = target
        if target < math.inf:
            delay = max(0.0, target - self._now().timestamp())
            self._handle = asyncio.get_running_loop().call_later(delay, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._armed_at = math.inf
        now = self._now().timestamp()
        queues: dict[str, int] = {}  # queue -> how many of its runs fell due
        while self._due and self._due[0][0] <= now:
            queue = self._due.pop(0)[1]
            queues[queue] = queues.get(queue, 0) + 1
        if queues:
            self._wake(queues)
        if now >= self._cursor_ts:
            self._read()
        else:
            self._arm()

    def _read(self) -> None:
        if self._running and self._reading is None:
            self._reading = asyncio.ensure_future(self._read_page())

    async def _read_page(self) -> None:
        assert self._cursor is not None
        try:
            page = await self._load(self._cursor, self._page)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("could not read the next due runs; retrying",
                        extra={"error": f"{type(exc).__name__}: {exc}"[:300],
                               "retryIn": RETRY_SECONDS})
            self._reading = None
            if self._running:
                self._armed_at = self._now().timestamp() + RETRY_SECONDS
                self._handle = asyncio.get_running_loop().call_later(RETRY_SECONDS, self._fire)
            return
        self._reading = None
        for when, _id, queue in page:
            self._due.add((when.timestamp(), queue))
        if len(page) >= self._page:
            when, _id, _queue = page[-1]
            self._cursor, self._cursor_ts = (when, _id), when.timestamp()
        else:
            self._cursor_ts = math.inf  # all of them are known; new ones are noted
        self._trim()
        if self._running:
            self._fire()
