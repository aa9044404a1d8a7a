"""A cancellation is never lost: `within` (mwapjobs/timeouts.py) lets a cancel that
arrives as the awaited thing finishes through (3.11's `asyncio.wait_for` swallowed it,
and a daemon's graceful stop then waited forever for a loop that went on), and
`Supervisor.stop` cancels again a task that swallowed its cancellation anyway."""

from __future__ import annotations

import asyncio
import time

import pytest

from mwapjobs import supervisor
from mwapjobs.supervisor import Supervisor
from mwapjobs.timeouts import within


async def test_a_cancel_as_the_awaited_thing_finishes_is_not_swallowed() -> None:
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    went_on: list[int] = []

    async def loop_body() -> None:
        went_on.append(await within(ready, 5))

    task = asyncio.ensure_future(loop_body())
    await asyncio.sleep(0)  # the task waits on `ready`
    ready.set_result(1)  # the awaited thing finishes ...
    task.cancel()  # ... and the cancel arrives in the same turn of the loop
    with pytest.raises(asyncio.CancelledError):
        await task
    assert went_on == []


async def test_within_times_out_and_passes_results() -> None:
    assert await within(asyncio.sleep(0, "done"), 1) == "done"
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await within(asyncio.Event().wait(), 0.05)
    assert time.monotonic() - started < 1


async def test_stop_cancels_again_a_task_that_swallowed_its_cancel(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor, "RECANCEL_SECONDS", 0.05)
    cancels: list[int] = []

    async def stubborn() -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancels.append(1)
                if len(cancels) == 1:
                    continue  # swallowed, as a flawed library call would
                raise

    tasks = Supervisor("test")
    tasks.keep("stubborn", stubborn)
    await asyncio.sleep(0)
    await asyncio.wait_for(tasks.stop(), 5)
    assert cancels == [1, 1]
