"""Per-provider limits, so a burst of due refreshes or probes never hammers one provider.

Each key (a provider id) gets its own concurrency cap and a steady rate: a
request may start only when fewer than `concurrency` are in flight for that
key and at least 1/`rate` seconds after the previous start actually began (not
after it was due to: a late start never lets the next one follow it at once).

A job's limiter may sit `within` a shared one (`JobContext.limiter`): a slot is then
one of the job's own and one of the shared limiter's for the same key, so refresh,
health checks and file indexing together never send a provider more than the shared
limits allow, and each of them alone no more than its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class _Gate:
    def __init__(self, concurrency: int, rate: float) -> None:
        self.slots = asyncio.Semaphore(concurrency)
        self.interval = 1.0 / rate
        self.next_start = 0.0
        self.lock = asyncio.Lock()
        self.in_flight = 0


class KeyedLimiter:
    def __init__(self, concurrency: int, rate: float, *,
                 within: KeyedLimiter | None = None) -> None:
        self.concurrency = concurrency
        self.rate = rate
        self.within = within  # a shared limiter whose slot every slot of this one also holds
        self._gates: dict[str, _Gate] = {}
        self.max_in_flight = 0

    def in_flight(self, key: str) -> int:
        gate = self._gates.get(key)
        return gate.in_flight if gate else 0

    @asynccontextmanager
    async def slot(self, key: str) -> AsyncIterator[None]:
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = _Gate(self.concurrency, self.rate)
        async with gate.slots:
            async with gate.lock:  # starts are spaced one interval apart, in arrival order
                wait = gate.next_start - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                # From the moment this one actually starts: a wake-up made late by a busy
                # loop must not let the next start follow at once (two starts together,
                # and a 1 s window with more than `rate` of them).
                gate.next_start = time.monotonic() + gate.interval
            async with contextlib.AsyncExitStack() as shared:
                if self.within is not None:  # own slot first: waiting here holds no shared one
                    await shared.enter_async_context(self.within.slot(key))
                gate.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, gate.in_flight)
                try:
                    yield
                finally:
                    gate.in_flight -= 1
