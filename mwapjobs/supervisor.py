"""Background loops, one way: named tasks that repeat a step, back off when it fails,
log failures without flooding the journal, and stop together.

    tasks = Supervisor()
    tasks.every("sweeper", 15.0, engine.sweep)        # a step every 15 s
    tasks.keep("worker:demo", lambda: work(queue))     # restarted if it ever crashes
    ...
    tasks.spawn("promote", promote(provider))          # one-off work in the background
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
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)

LOG_EVERY = 60.0
# A task still running this long after `cancel()` is cancelled again (it swallowed it);
# longer than any clean-up on cancellation here (a last save, handing work back).
RECANCEL_SECONDS = 10.0


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
        self._once: set[asyncio.Task[Any]] = set()

    def names(self) -> list[str]:
        return [name for name, task in self._tasks.items() if not task.done()]

    def every(self, name: str, interval: float, step: Callable[[], Awaitable[Any]], *,
              first: float | None = None, max_backoff: float | None = None,
              message: str = "background task failed; retrying") -> None:
        """Run `step()` every `interval` seconds (the first time after `first`, default
        `interval`); after a failure (logged as `message`), retry later by doubling from
        `interval` up to `max_backoff` (default: `interval`, i.e. no backoff)."""
        failures = FailureLog(log, message, task=name)
        self._start(name, self._every(failures, interval, step,
                                      interval if first is None else first,
                                      max_backoff or interval))

    def keep(self, name: str, factory: Callable[[], Awaitable[None]], *,
             max_backoff: float = 30.0,
             message: str = "background task crashed; restarting it") -> None:
        """Run `factory()` until it returns; when it raises (logged as `message`), run it
        again after 1 s, doubling up to `max_backoff`."""
        self._start(name, self._keep(FailureLog(log, message, task=name), factory,
                                     max_backoff))

    def spawn(self, name: str, coro: Coroutine[Any, Any, Any]) -> None:
        """Run `coro` once in the background (a failure is logged); `stop` cancels it."""
        task = asyncio.ensure_future(self._once_logged(name, coro))
        task.set_name(f"{self._prefix}:{name}")
        self._once.add(task)
        task.add_done_callback(self._once.discard)

    async def _once_logged(self, name: str, coro: Coroutine[Any, Any, Any]) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("background task failed", extra={
                "task": name, "error": f"{type(exc).__name__}: {exc}"[:300]})

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

    def cancel_all(self) -> None:
        """Cancel every task now, without waiting for their clean-up (`stop` waits)."""
        for task in [*self._tasks.values(), *self._once]:
            task.cancel()

    async def stop(self) -> None:
        """Cancel every task and wait for them; a task that swallowed its cancellation
        (a library may, as `asyncio.wait_for` does in 3.11) is cancelled again every
        RECANCEL_SECONDS rather than waited for forever."""
        pending = {*self._tasks.values(), *self._once}
        self._tasks.clear()
        self._once.clear()
        for task in pending:
            if not task.cancelling():  # not again: a second cancel cuts its clean-up short
                task.cancel()
        while pending:
            _done, pending = await asyncio.wait(pending, timeout=RECANCEL_SECONDS)
            for task in pending:
                task.cancel()

    @staticmethod
    async def _every(failures: FailureLog, interval: float,
                     step: Callable[[], Awaitable[Any]], first: float,
                     max_backoff: float) -> None:
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

    @staticmethod
    async def _keep(failures: FailureLog, factory: Callable[[], Awaitable[None]],
                    max_backoff: float) -> None:
        while True:
            try:
                await factory()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures.failed(exc)
                await asyncio.sleep(min(max_backoff, 2.0 ** min(failures.failures - 1, 30)))
