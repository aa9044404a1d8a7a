"""A cancellation is never lost: `within` (mwapjobs/timeouts.py) lets a cancel that
arrives as the awaited thing finishes through (3.11's `asyncio.wait_for` swallowed it,
and a daemon's graceful stop then waited forever for a loop that went on), and
`Supervisor.stop` cancels again a task that swallowed its cancellation anyway."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import pytest

from mwapjobs import supervisor
from mwapjobs.supervisor import Supervisor
from mwapjobs.timeouts import TimeLimits, passed, within


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


# -- TimeLimits: many tasks' limits on one timer ----------------------------------------

INF = math.inf


@pytest.mark.parametrize(("limits", "now", "over", "again"), [
    ([], 10.0, [], INF),
    ([("a", 9.0), ("b", 10.0)], 10.0, ["a", "b"], INF),  # at the limit is over
    ([("a", 9.0), ("b", 12.0), ("c", 11.0)], 10.0, ["a"], 11.0),  # the earliest left
    ([("a", 10.01)], 10.0, [], 10.05),  # not before the granularity
    ([("a", 30.0), ("b", 40.0)], 10.0, [], 30.0),
])
def test_passed_tells_what_is_over_and_when_to_look_again(
        limits: list[tuple[str, float]], now: float, over: list[str], again: float) -> None:
    assert passed(limits, now, granularity=0.05) == (over, again)


async def limited(limits: TimeLimits, seconds: float | None,
                  body: Any) -> tuple[str, tuple[bool, int]]:
    """`body` under a limit, as the engine runs a handler: what came of it, and `end`."""
    outcome = "returned"
    ended = (False, 0)
    try:
        limits.begin(asyncio.current_task(), seconds)
        try:
            await body
        finally:
            ended = limits.end(asyncio.current_task())
    except asyncio.CancelledError:
        if not ended[0] or ended[1]:
            raise
        outcome = "timed out"
    return outcome, ended


async def test_a_limit_cancels_its_task_and_end_says_so() -> None:
    limits = TimeLimits()
    started = time.monotonic()
    outcome, ended = await limited(limits, 0.1, asyncio.Event().wait())
    assert (outcome, ended) == ("timed out", (True, 0))
    assert 0.1 <= time.monotonic() - started < 2
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_an_ended_limit_cancels_nothing_and_one_timer_serves_them_all() -> None:
    limits = TimeLimits()
    first = await limited(limits, 0.2, asyncio.sleep(0))
    timer = limits._timer
    second = await limited(limits, 0.3, asyncio.sleep(0))  # later: no new timer
    assert first == second == ("returned", (False, 0))
    assert limits._timer is timer is not None
    await asyncio.sleep(0.35)  # the timer fired for nothing and is not armed again
    assert limits._timer is None and limits._limits == {} and limits._fired == set()


async def test_a_shorter_limit_begun_later_fires_at_its_own_time() -> None:
    limits = TimeLimits()
    long = asyncio.ensure_future(limited(limits, 30, asyncio.Event().wait()))
    await asyncio.sleep(0)
    started = time.monotonic()
    assert await limited(limits, 0.1, asyncio.Event().wait()) == (
        "timed out", (True, 0))
    assert time.monotonic() - started < 2
    assert not long.done()  # its own limit is still ahead
    long.cancel()
    with pytest.raises(asyncio.CancelledError):
        await long


async def test_a_cancel_from_elsewhere_stays_a_cancel_even_at_the_limit() -> None:
    limits = TimeLimits()
    gate = asyncio.Event()
    task = asyncio.ensure_future(limited(limits, 30, gate.wait()))
    await asyncio.sleep(0)
    task.cancel()  # a shutdown
    with pytest.raises(asyncio.CancelledError):
        await task

    async def body() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:  # the limit's cancel arrives first ...
            asyncio.current_task().cancel()  # type: ignore[union-attr]  # ... then a shutdown's
            await asyncio.sleep(0)

    both = asyncio.ensure_future(limited(limits, 0.05, body()))
    with pytest.raises(asyncio.CancelledError):
        await both
