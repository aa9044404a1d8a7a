"""The engine's pure decisions: when to retry, and what a crash means for a run.

No I/O and no clock of their own, so they are tested as tables
(tests/test_policy.py).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from .queues import Backoff

# A run found active at this many crashes runs alone next time (see `stall_verdict`).
ISOLATE_AFTER_CRASHES = 2


def retry_time(*, attempt: int, max_attempts: int, backoff: Backoff, now: datetime,
               retry_after: float | None = None, deadline: datetime | None = None,
               rand: Callable[[], float] = random.random) -> datetime | None:
    """When to try again after failed attempt number `attempt`, or None: the attempts
    are used up, or the deadline would pass before the next one could run."""
    if attempt >= max_attempts:
        return None
    delay = backoff.delay_for(attempt, rand)
    if retry_after is not None:
        delay = max(delay, retry_after)  # what the far side asked for, at least
    when = now + timedelta(seconds=delay)
    if deadline is not None and when >= deadline:
        return None
    return when


@dataclass(frozen=True)
class StallVerdict:
    state: Literal["waiting", "failed"]
    crashes: int  # crashes this run was active at, this one included
    stalled: int  # crashes it was alone at (the ones it is blamed for)
    isolate: bool  # run it alone in its process next time


def stall_verdict(*, crashes: int, stalled: int, alone: bool, limit: int) -> StallVerdict:
    """What to do with a run that was active when its process died.

    A process that dies takes every run it was running with it, and usually only one
    of them (if any) is to blame. So a crash is held against a run only when the run
    was alone in its process (`alone`); a run active at `ISOLATE_AFTER_CRASHES` crashes
    or more, or blamed once, is run alone next time (`isolate`), where a crash can be
    pinned on it. It fails once it has been blamed more than `limit` times. A job that
    kills its process every time thus fails after a few restarts, while the runs that
    merely shared its process complete, and an operator's kill hits an isolated run
    only by bad luck, several times in a row before it counts for anything.
    """
    crashes += 1
    stalled += int(alone)
    if stalled > limit:
        return StallVerdict("failed", crashes, stalled, False)
    return StallVerdict("waiting", crashes, stalled,
                        alone or stalled > 0 or crashes >= ISOLATE_AFTER_CRASHES)
