"""The health sweep's batched writer: per-integration results into few writes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from ...storage.integrations import IntegrationStore
from ...timeouts import within

log = logging.getLogger(__name__)

# Results are written in batches, every FLUSH_DELAY s or FLUSH_MAX results, whichever
# comes first, while the probes go on. Each batch is cut into range updates of results
# dense in id order (RUN_GAP), at most MAX_RUN each.
FLUSH_MAX = 2000
FLUSH_DELAY = 5.0
RUN_GAP = 256  # a split costs a query (a scan on the embedded store); a gap, only those documents
MAX_RUN = 2000


class ResultWriter:
    """Batches the per-integration results of a sweep into few `record_health` calls.

    A result waits at most FLUSH_DELAY s, or less when FLUSH_MAX are waiting; one
    batch is written at a time while the probes go on, so the writes of a fast
    sweep hide behind its probing and only the last batch adds to its duration.
    Each batch is cut into runs that are dense in id order (`RUN_GAP`, at most
    MAX_RUN), one range update each: a fast sweep of 10,000 integrations makes
    about five writes, a spread one a few small ones every FLUSH_DELAY s.
    """

    def __init__(self, store: IntegrationStore, positions: dict[str, int],
                 history_size: int, notes: asyncio.Future[Any]) -> None:
        self.store = store
        self.positions = positions
        self.history_size = history_size
        self.notes = notes
        self.pending: list[tuple[str, dict[str, Any]]] = []
        self.writes = 0
        self.db_seconds = 0.0
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        self._closing = False

    def add(self, integration_id: str, result: dict[str, Any]) -> None:
        self.pending.append((integration_id, result))
        self._wake.set()
        if len(self.pending) >= FLUSH_MAX:
            self._full.set()

    def close(self) -> None:
        self._closing = True
        self._wake.set()
        self._full.set()

    async def run(self) -> None:
        await asyncio.shield(self.notes)  # the documents must exist before we update them
        while True:
            if not self.pending:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if not self._closing and len(self.pending) < FLUSH_MAX:
                self._full.clear()
                with contextlib.suppress(TimeoutError):
                    await within(self._full.wait(), FLUSH_DELAY)
            batch, self.pending = self.pending, []
            await self._flush(batch)

    async def _flush(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        latest = {i: r for i, r in batch}  # the same integration twice: the later one wins
        ordered = sorted(latest.items(), key=lambda r: (self.positions.get(r[0], -1), r[0]))
        runs: list[list[tuple[str, dict[str, Any]]]] = []
        previous = None
        for integration_id, result in ordered:
            position = self.positions.get(integration_id)
            if (not runs or position is None or previous is None
                    or position - previous > RUN_GAP or len(runs[-1]) >= MAX_RUN):
                runs.append([])
            runs[-1].append((integration_id, result))
            previous = position
        started = time.monotonic()
        for run in runs:
            try:
                await self.store.record_health(run, self.history_size)
                self.writes += 1
            except Exception as exc:
                log.warning("could not record health results; they are lost, the next "
                            "sweep records new ones",
                            extra={"count": len(run),
                                   "error": f"{type(exc).__name__}: {exc}"[:300]})
        self.db_seconds += time.monotonic() - started
