"""The per-provider limiter every job shares (`JobContext.limiter`): a job's own limiter
sits `within` it, so jobs together stay within the shared limits and each alone within
its own."""

from __future__ import annotations

import asyncio
import itertools
import time

from mwapjobs.jobs.context import provider_limits
from mwapjobs.ratelimit import KeyedLimiter
from tests.conftest import make_settings, wait_for


async def _busy(limiter: KeyedLimiter, key: str, seen: list[int], shared: KeyedLimiter,
                hold: asyncio.Event) -> None:
    async with limiter.slot(key):
        seen.append(shared.in_flight(key))
        await hold.wait()


async def test_two_jobs_together_never_exceed_the_shared_concurrency() -> None:
    shared = KeyedLimiter(3, 1000.0)
    refresh = KeyedLimiter(2, 1000.0, within=shared)
    files = KeyedLimiter(2, 1000.0, within=shared)
    hold, seen = asyncio.Event(), []
    tasks = [asyncio.create_task(_busy(limiter, "p1", seen, shared, hold))
             for limiter in (refresh, refresh, files, files)]
    await asyncio.sleep(0.05)
    assert shared.in_flight("p1") == 3  # the fourth waits for a shared slot
    assert refresh.in_flight("p1") + files.in_flight("p1") == 3
    assert max(seen) <= 3
    other = asyncio.create_task(_busy(files, "p2", [], shared, hold))
    await asyncio.sleep(0.05)
    assert shared.in_flight("p2") == 1  # another provider has its own lanes
    hold.set()
    await asyncio.gather(*tasks, other)
    assert shared.max_in_flight == 3 and shared.in_flight("p1") == 0


async def test_a_job_alone_keeps_its_own_limit() -> None:
    shared = KeyedLimiter(10, 1000.0)
    job = KeyedLimiter(2, 1000.0, within=shared)
    hold = asyncio.Event()
    tasks = [asyncio.create_task(_busy(job, "p", [], shared, hold)) for _ in range(5)]
    await asyncio.sleep(0.05)
    assert job.in_flight("p") == 2 and shared.in_flight("p") == 2
    hold.set()
    await asyncio.gather(*tasks)


async def test_starts_are_spaced_by_the_shared_rate_across_jobs() -> None:
    shared = KeyedLimiter(10, 20.0)  # a start every 50 ms
    a, b = KeyedLimiter(10, 1000.0, within=shared), KeyedLimiter(10, 1000.0, within=shared)
    loop = asyncio.get_running_loop()
    starts: list[float] = []

    async def start(limiter: KeyedLimiter) -> None:
        async with limiter.slot("p"):
            starts.append(loop.time())

    await asyncio.gather(*(start(limiter) for limiter in (a, b, a, b)))
    gaps = [later - earlier for earlier, later in itertools.pairwise(sorted(starts))]
    assert min(gaps) >= 0.04, gaps


def test_the_shared_limits_are_the_largest_any_job_configures() -> None:
    settings = make_settings(refresh={"provider_concurrency": 2, "provider_rate": 30.0},
                             health={"provider_concurrency": 7, "provider_rate": 5.0},
                             files={"provider_concurrency": 1, "provider_rate": 1.0})
    assert provider_limits(settings) == (7, 30.0)


def busy(seconds: float) -> None:
    """Hold the event loop (and the CPU) for `seconds`."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


async def test_a_start_made_late_by_a_busy_loop_does_not_let_the_next_follow_at_once() -> None:
    limiter = KeyedLimiter(10, 5.0)  # a start every 200 ms
    loop = asyncio.get_running_loop()
    starts: list[float] = []

    async def start() -> None:
        async with limiter.slot("p"):
            starts.append(loop.time())

    tasks = [asyncio.create_task(start()) for _ in range(3)]
    # The first has started, the second sleeps towards its turn holding the gate's lock.
    await wait_for(lambda: len(starts) == 1 and limiter._gates["p"].lock.locked(),
                   interval=0.001)
    busy(0.4)  # the loop is busy past the second's turn (a CPU burst elsewhere)
    await asyncio.gather(*tasks)
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    assert gaps[0] >= 0.19 and gaps[1] >= 0.19, gaps  # the third waits its interval
