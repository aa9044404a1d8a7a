"""Background loops, one way: named tasks that repeat a step, back off when it fails,
log failures without flooding the journal, and stop together.

    tasks = Supervisor()
    tasks.every("sweeper", 15.0, engine.sweep)        # a step every 15 s
    tasks.keep("worker:demo", lambda: work(queue))     # restarted if it ever crashes
    ...
    await tasks.stop()                                 # cancel all, wait for them

A failing step is logged at warning level the first time, then at most once per
`LOG_EVERY` seconds (with how many failures were not logged), and once more at info
level when it succeeds again. While it fails, the next try waits twice as long each
time, up to `max_backoff`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

LOG_EVERY = 60.0


class FailureLog:
    """Rate-limited logging of one recurring failure (a loop, a connection)."""

    def __init__(self, logger: logging.Logger, message: str, **fields: Any) -> None:
        self._log = logger
        self._message = message
        self._fields = fields
        self.failures = 0
        self._last = -LOG_EVERY
        self._unlogged = 0

    def failed(self, exc: BaseException, **extra: Any) -> None:
        self.failures += 1
        now = time.monotonic()
        if now - self._last < LOG_EVERY:
            self._unlogged += 1
            return
        fields = {**self._fields, **extra, "error": f"{type(exc).__name__}: {exc}"[:300],
                  "failures": self.failures}
        if self._unlogged:
            fields["notLogged"] = self._unlogged
        self._last, self._unlogged = now, 0
        self._log.warning(self._message, extra=fields)

    def succeeded(self) -> None:
        if self.failures:
            self._log.info(f"{self._message}: recovered", extra={**self._fields,
                                                                  "failures": self.failures})
        self.failures, self._unlogged, self._last = 0, 0, -LOG_EVERY


class Supervisor:
    def __init__(self, prefix: str = "mwapjobs") -> None:
        self._prefix = prefix
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def names(self) -> list[str]:
        return [name for name, task in self._tasks.items() if not task.done()]

    def every(self, name: str, interval: float, step: Callable[[], Awaitable[Any]], *,
              first: float | None = None, max_backoff: float | None = None) -> None:
        """Run `step()` every `interval` seconds (the first time after `first`, default
        `interval`); after a failure, retry sooner or later by doubling from `interval`
        up to `max_backoff` (default: `interval`, i.e. no backoff)."""
        self._start(name, self._every(name, interval, step,
                                      interval if first is None else first,
                                      max_backoff or interval))

    def keep(self, name: str, factory: Callable[[], Awaitable[None]], *,
             max_backoff: float = 30.0) -> None:
        """Run `factory()` and run it again if it ever raises (after 1 s, doubling)."""
        self._start(name, self._keep(name, factory, max_backoff))

    def _start(self, name: str, coro: Any) -> None:
        old = self._tasks.get(name)
        if old is not None and not old.done():
            raise RuntimeError(f"task {name!r} is already running")
        task = asyncio.ensure_future(coro)
        task.set_name(f"{self._prefix}:{name}")
        self._tasks[name] = task

    async def cancel(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _every(self, name: str, interval: float, step: Callable[[], Awaitable[Any]],
                     first: float, max_backoff: float) -> None:
        failures = FailureLog(log, "background task failed; retrying", task=name)
        delay = first
        while True:
            await asyncio.sleep(delay)
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures.failed(exc)
                delay = min(max_backoff, interval * 2 ** min(failures.failures, 30))
                continue
            failures.succeeded()
            delay = interval

    async def _keep(self, name: str, factory: Callable[[], Awaitable[None]],
                    max_backoff: float) -> None:
        failures = FailureLog(log, "background task crashed; restarting it", task=name)
        while True:
            try:
                await factory()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures.failed(exc)
                await asyncio.sleep(min(max_backoff, 2.0 ** min(failures.failures - 1, 30)))
