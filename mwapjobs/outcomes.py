"""Writing the outcomes of attempts: in batches, and again until MongoDB takes them.

When a handler returns or raises, the engine hands its outcome here and frees the
queue's slot at once. One task writes whatever has accumulated in one round trip
per kind (`RunStore.write_outcomes`), each run still under its owner-checked filter.
If MongoDB is away, the same batch is tried again with backoff, as long as it takes:
the runs stay leased meanwhile (the engine keeps renewing them), so the work done is
not done again by someone else, and the outcome is not lost. Only a run whose lease
was taken over is dropped here, and said so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .storage.runs import Outcome, RunId, RunStore
from .supervisor import FailureLog
from .timeouts import within

log = logging.getLogger(__name__)

MAX_BATCH = 500
RETRY_FIRST, RETRY_MAX = 0.1, 5.0  # seconds between tries while MongoDB is away


@dataclass
class Finished:
    """One attempt's outcome and what to do once it is written."""

    outcome: Outcome
    queue: str
    event: str  # the engine event to emit once written
    payload: dict[str, Any]
    due: datetime | None = None  # a retry's time, for the due timer


OnWritten = Callable[[list[Finished], set[RunId]], Awaitable[None]]


class OutcomeWriter:
    def __init__(self, runs: RunStore, owner: str, on_written: OnWritten) -> None:
        self._runs = runs
        self._owner = owner
        self._on_written = on_written
        self._pending: list[Finished] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.batches = 0

    def submit(self, item: Finished) -> None:
        self._pending.append(item)
        self._idle.clear()
        self._wake.set()

    def run_ids(self) -> list[RunId]:
        return [f.outcome.run_id for f in self._pending]

    async def flush(self, timeout: float) -> bool:
        """Wait up to `timeout` s for everything submitted to be written; False if not."""
        with contextlib.suppress(TimeoutError):
            await within(self._idle.wait(), timeout)
        return self._idle.is_set()

    async def run(self) -> None:
        failures = FailureLog(log, "could not write run outcomes; retrying until MongoDB "
                                   "answers (the runs stay leased)")
        while True:
            if not self._pending:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            await asyncio.sleep(0)  # let the rest of this tick's outcomes join the batch
            batch = self._pending[:MAX_BATCH]
            token = uuid.uuid4().hex
            delay = RETRY_FIRST
            while True:
                try:
                    written = await self._runs.write_outcomes(
                        self._owner, [f.outcome for f in batch], token)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    failures.failed(exc, runs=len(batch))
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX)
            failures.succeeded()
            self.batches += 1
            del self._pending[:len(batch)]
            await self._on_written(batch, written)
