"""Garbage collection off the hot path.

A full (generation 2) collection stops every thread for as long as it takes to scan
every tracked object that is not frozen. With the embedded store's documents in the
heap that is tens to hundreds of milliseconds, and a burst of runs allocates enough to
trigger dozens of them: they were the loop's longest stalls. So, while a daemon runs:

- the objects alive at start are frozen (never scanned again: `gc.freeze`);
- automatic collections stay young (generations 0 and 1 scan only what was allocated
  lately: a millisecond or so), and generation 0 waits for `YOUNG_THRESHOLD` new
  containers rather than CPython's 700: a claim of 200 runs makes a thousand at once,
  which at 700 started a collection each time (344 in a burst of 10,000 runs, 70 ms of
  its CPU, for next to no garbage: the claim's containers die with it, by reference
  count); at 5,000, one. Generation 1 is collected every `MIDDLE_THRESHOLD`-th time
  (CPython: 10), so that it never holds more than a few young collections' survivors:
  at 10, one such collection in a burst took 21 ms;
- the full collection is made here, `decide`d every TICK seconds: when the process is
  calm (it used at most `CALM_CPU` of a core since the last tick: no burst under way)
  and the last one is `CALM_INTERVAL` s old, or unconditionally after `MAX_INTERVAL`
  s; what survives it is frozen, so the next one scans only what came since;
- every `THAW_EVERY`-th full collection unfreezes everything first, so that a cycle
  frozen while alive, which died later, is freed too (one longer pause, when calm).

One policy per process: daemons started in one process (tests) share it, and the
interpreter's own thresholds come back when the last one stops.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from .supervisor import Supervisor

log = logging.getLogger(__name__)

TICK = 2.0
CALM_INTERVAL = 60.0
MAX_INTERVAL = 600.0
CALM_CPU = 0.25  # of a core, since the last tick
YOUNG_THRESHOLD = 5_000
MIDDLE_THRESHOLD = 2
THAW_EVERY = 10
# Generation 2 would be collected after this many generation-1 collections: never, in
# practice (this module collects it).
NO_AUTOMATIC_FULL = 1_000_000

Step = Literal["wait", "collect", "thaw-and-collect"]


def decide(since_full: float, cpu: float, fulls: int) -> Step:
    """What to do at a tick, `since_full` s after the last full collection (`fulls` of
    them so far), the process having used `cpu` of a core lately. I/O-free."""
    calm = cpu <= CALM_CPU
    if since_full < MAX_INTERVAL and not (calm and since_full >= CALM_INTERVAL):
        return "wait"
    return "thaw-and-collect" if (fulls + 1) % THAW_EVERY == 0 else "collect"


@dataclass
class _State:
    users: int = 0
    saved_threshold: tuple[int, int, int] = (700, 10, 10)
    last_full: float = 0.0
    last_tick: float = 0.0
    cpu_at_tick: float = 0.0  # process CPU seconds
    fulls: int = 0


_state = _State()


def install(tasks: Supervisor) -> Callable[[], None]:
    """A daemon starts: freeze what is alive, leave full collections to `tick`, run
    every TICK s among `tasks`. Returns what the daemon calls once it stopped (once
    is enough: later calls do nothing)."""
    _take()
    tasks.every("gc", TICK, tick)
    released: list[bool] = []

    def release() -> None:
        if not released:
            released.append(True)
            _give_back()

    return release


def _take() -> None:
    if _state.users == 0:
        young, middle, _ = gc.get_threshold()
        _state.saved_threshold = gc.get_threshold()
        gc.set_threshold(max(young, YOUNG_THRESHOLD), min(middle, MIDDLE_THRESHOLD),
                         NO_AUTOMATIC_FULL)
        _state.last_full = _state.last_tick = time.monotonic()
        _state.cpu_at_tick = time.process_time()
    _state.users += 1
    gc.freeze()


def _give_back() -> None:
    """The last daemon to stop gives the interpreter its thresholds back."""
    _state.users = max(0, _state.users - 1)
    if _state.users == 0:
        gc.set_threshold(*_state.saved_threshold)


async def tick() -> None:
    """Every TICK s (a background task): a full collection if `decide` says so."""
    now, cpu = time.monotonic(), time.process_time()
    elapsed = max(now - _state.last_tick, 1e-3)
    used = (cpu - _state.cpu_at_tick) / elapsed
    _state.last_tick, _state.cpu_at_tick = now, cpu
    step = decide(now - _state.last_full, used, _state.fulls)
    if step == "wait":
        return
    started = time.perf_counter()
    if step == "thaw-and-collect":
        gc.unfreeze()
    freed = gc.collect()
    gc.freeze()
    _state.fulls += 1
    _state.last_full = time.monotonic()
    _state.cpu_at_tick = time.process_time()  # (not the collection's own CPU)
    log.debug("full garbage collection", extra={
        "step": step, "freed": freed, "frozen": gc.get_freeze_count(),
        "ms": round((time.perf_counter() - started) * 1000, 1)})
