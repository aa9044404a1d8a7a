"""Time limits: `within` (`asyncio.wait_for` without its Python 3.11 flaw) and
`TimeLimits` (the limits of many tasks on one timer).

In 3.11 a cancellation that reaches `wait_for` just as the awaited thing finishes is
swallowed: `wait_for` returns the result and the task goes on as if never cancelled
(CPython gh-86296, fixed in 3.12 by building `wait_for` on `asyncio.timeout`). A
background loop hit that way ignores its `cancel()` and a graceful stop waits for it
forever. `asyncio.timeout` counts cancellations properly, so this is `wait_for` on it.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Hashable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)

GRANULARITY = 0.05  # seconds: the least time between two checks of `TimeLimits`


async def within(awaitable: Awaitable[T], seconds: float | None) -> T:
    """Await `awaitable` for at most `seconds` (None: no limit); TimeoutError after."""
    async with asyncio.timeout(seconds):
        return await awaitable


def passed(limits: Iterable[tuple[K, float]], now: float,
           granularity: float = GRANULARITY) -> tuple[list[K], float]:
    """Which of `limits` ((key, loop time)) have passed at `now`, and when to look
    again (inf: never): at the earliest one left, but not before `granularity` from
    now, so that a stream of limits a moment apart is checked in batches. I/O-free."""
    over: list[K] = []
    earliest = math.inf
    for key, at in limits:
        if at <= now:
            over.append(key)
        elif at < earliest:
            earliest = at
    return over, earliest if earliest == math.inf else max(earliest, now + granularity)


class TimeLimits:
    """The time limits of many tasks, on one timer of the event loop.

    An engine runs each handler under its queue's timeout. `asyncio.timeout` around
    each run costs a timer handle, its heap entry and its clean-up: a tenth of the
    loop's work per run in a profile of a burst of short runs. Here a limit is a dict entry;
    one timer, armed for the earliest limit, cancels the tasks whose limit passed, and
    `end` tells each task whether that cancellation was its limit's (and takes it
    back from the task's cancel count, as `asyncio.timeout` does), so that the task
    can turn it into a TimeoutError while a cancellation from elsewhere (a shutdown)
    stays one. A limit fires within `GRANULARITY` s of its time.
    """

    def __init__(self) -> None:
        self._limits: dict[asyncio.Task[Any], float] = {}
        self._fired: set[asyncio.Task[Any]] = set()  # cancelled by their limit, not ended
        self._timer: asyncio.TimerHandle | None = None
        self._armed = math.inf  # when the timer fires

    def begin(self, task: asyncio.Task[Any] | None, seconds: float | None) -> None:
        """`task` (the current one) is limited to `seconds` from now, until `end(task)`;
        None: no limit. (Keyed by the task: a task hashes in C, a run's ObjectId in
        Python.)"""
        if seconds is None or task is None:
            return
        loop = task.get_loop()
        at = loop.time() + seconds
        self._limits[task] = at
        if at < self._armed:
            self._arm(loop, at)

    def end(self, task: asyncio.Task[Any] | None) -> tuple[bool, int]:
        """`task` left its limited part: (whether its limit passed and cancelled it,
        how many other cancellations it still has: more than 0 is a real cancel)."""
        if task is None or self._limits.pop(task, None) is not None:
            return False, 0
        if task not in self._fired:
            return False, 0
        self._fired.discard(task)
        return True, task.uncancel()

    def _arm(self, loop: asyncio.AbstractEventLoop, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed = at
        self._timer = loop.call_at(at, self._check, loop)

    def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer, self._armed = None, math.inf
        over, again = passed(self._limits.items(), loop.time())
        for task in over:
            del self._limits[task]
            self._fired.add(task)
            task.cancel()
        if again != math.inf:
            self._arm(loop, again)
