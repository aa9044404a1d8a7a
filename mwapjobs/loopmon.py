"""Event-loop lag, measured rather than assumed.

A task asks to sleep for `interval` and records how much later than that it
woke up. Anything that blocks the loop (a synchronous call, a CPU burst)
shows up here, in /metrics and in the benchmarks.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque


class LoopLagMonitor:
    def __init__(self, interval: float = 0.05, window: int = 1200) -> None:
        self.interval = interval
        self.samples: deque[float] = deque(maxlen=window)
        self.max_lag = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def reset(self) -> None:
        self.samples.clear()
        self.max_lag = 0.0

    async def _run(self) -> None:
        while True:
            start = time.perf_counter()
            await asyncio.sleep(self.interval)
            lag = max(0.0, time.perf_counter() - start - self.interval)
            self.samples.append(lag)
            self.max_lag = max(self.max_lag, lag)

    def percentile(self, q: float) -> float:
        """Lag (seconds) at quantile q (0..1) over the recent window."""
        if not self.samples:
            return 0.0
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
