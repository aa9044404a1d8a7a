"""Health-check sweeps over time: spreading probes over the interval, the concurrency
and rate limits, no overlapping sweeps, stopping mid-sweep, the default schedule."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any

import pytest
from bson import ObjectId

from mwapjobs.jobs.health.schedule import (
    QUEUE,
    SPREAD_FRACTION,
    SWEEP_JOB_ID,
    offset_fraction,
    spread_window,
)
from mwapjobs.storage.mongo import Mongo
from mwapjobs.storage.names import RUNS
from tests.conftest import wait_for
from tests.support import health_world
from tests.support.health_world import World, world
from tests.support.mwap_data import utcnow
from tests.support.oauth_server import OAuthServer
from tests.support.providers import ProviderServer, Reply

# This module's fixtures (tests/support/health_world.py); tests/conftest.py's `oauth`
# and `oauth_server` are the token-refresh tests'.
oauth_server = health_world.oauth_server
oauth = health_world.oauth
providers = health_world.providers
w = health_world.w


# -- spreading, limits, no overlap ----------------------------------------------------------


FIXED_IDS = [f"{n:024x}" for n in range(1, 21)]


async def _arrivals(w: World, window: float) -> dict[str, float]:
    """Run one sweep; each integration's probe arrival minus the sweep's estimated start."""
    w.api.clear_stats()
    report = await w.sweep(window=window)
    assert report.healthy == len(FIXED_IDS)
    by_token = {p.token: p.arrived for p in w.api.requests}
    arrivals = {iid: by_token[f"at-{iid}"] for iid in FIXED_IDS}
    # The start of the sweep, from the probes themselves: median of arrival - offset.
    starts = sorted(arrivals[i] - offset_fraction(i) * window for i in FIXED_IDS)
    t0 = starts[len(starts) // 2]
    return {i: arrivals[i] - t0 for i in FIXED_IDS}


async def test_probes_are_spread_over_the_interval_deterministically(w: World) -> None:
    for n, iid in enumerate(FIXED_IDS):
        await w.integration(("google", "dropbox")[n % 2], integration_id=iid,
                            access_token=f"at-{iid}")
    # A 2-second interval repeat: the sweep spreads over SPREAD_FRACTION of it.
    window = spread_window({"spread": True, "every": 2}, utcnow(), utcnow(), w.checker.settings)
    assert window == pytest.approx(2 * SPREAD_FRACTION, abs=0.05)
    first = await _arrivals(w, window)
    for iid in FIXED_IDS:
        assert first[iid] == pytest.approx(offset_fraction(iid) * window, abs=0.15), iid
    fractions = [offset_fraction(i) for i in FIXED_IDS]
    assert max(fractions) - min(fractions) > 0.7  # these fixed ids cover most of it
    assert max(first.values()) - min(first.values()) == pytest.approx(
        (max(fractions) - min(fractions)) * window, abs=0.2)
    second = await _arrivals(w, window)
    for iid in FIXED_IDS:  # same place in the interval every time
        assert second[iid] == pytest.approx(first[iid], abs=0.15), iid
    assert spread_window({"spread": False}, utcnow(), utcnow(), w.checker.settings) == 0.0


async def test_without_spreading_probes_run_as_fast_as_the_limits_allow(
        mongo: Mongo, oauth: OAuthServer) -> None:
    async with ProviderServer(latency=0.1) as slow, \
            world(mongo, oauth, slow, concurrency=4, provider_concurrency=3) as w:
        for n in range(20):
            await w.integration(("google", "dropbox")[n % 2], refresh=False)
        started = time.monotonic()
        report = await w.sweep()
        elapsed = time.monotonic() - started
        assert report.healthy == 20
        assert slow.peak == 4 and max(slow.peak_by_tag.values()) == 3  # used, never exceeded
        assert 0.45 < elapsed < 0.9, elapsed  # 20 probes x 0.1 s / 4 in flight = 0.5 s


async def test_probe_starts_respect_the_provider_rate(mongo: Mongo, oauth: OAuthServer,
                                                      providers: ProviderServer) -> None:
    async with world(mongo, oauth, providers, provider_rate=20) as w:
        for _ in range(6):
            await w.integration("microsoft", refresh=False)
        await w.sweep()
        starts = sorted(p.arrived for p in providers.requests)
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        assert len(starts) == 6 and min(gaps) > 0.04, gaps  # 1/20 s apart


async def test_a_slow_provider_does_not_hold_up_the_others(mongo: Mongo, oauth: OAuthServer,
                                                           providers: ProviderServer) -> None:
    async with world(mongo, oauth, providers, concurrency=4, provider_concurrency=2,
                     request_timeout=5) as w:
        for _ in range(4):
            _, token = await w.integration("dropbox", refresh=False)
            providers.reply(token, Reply.slow(1.0))
        for _ in range(8):
            await w.integration("google", refresh=False)
        sweep = asyncio.ensure_future(w.sweep())
        # Google's 8 probes finish while Dropbox's lanes still wait on their slow answers.
        await wait_for(lambda: sum(p.kind == "google" and p.finished is not None
                                   for p in providers.requests) == 8, timeout=0.8,
                       message="the fast provider done within the slow one's first answer")
        await sweep


async def test_a_sweep_still_running_when_the_next_is_due_is_not_doubled(
        mongo: Mongo, oauth: OAuthServer, providers: ProviderServer,
        caplog: pytest.LogCaptureFixture) -> None:
    async with world(mongo, oauth, providers, request_timeout=2.5) as w:
        _, token = await w.integration("google", refresh=False)
        providers.script(token, Reply.hang_forever())  # the first sweep lasts 2.5 s
        caplog.set_level(logging.INFO, logger="mwapjobs.engine")

        async def runs() -> list[dict[str, Any]]:
            docs: list[dict[str, Any]] = await mongo.call(
                lambda db: db[RUNS].find({"queue": QUEUE}).sort("createdAt", 1).to_list(None))
            return docs

        await w.daemon.engine.repeat(QUEUE, {"spread": False}, every=1, job_id=SWEEP_JOB_ID)
        await wait_for(lambda: w.checker.progress() is not None, message="first sweep running")
        await wait_for(lambda: any(r.getMessage().startswith("repeat fire skipped")
                                   for r in caplog.records),
                       timeout=5, message="a fire while the sweep runs")
        [first] = await runs()
        assert first["state"] == "active"
        assert len(providers.requests) == 1  # no second sweep probing meanwhile

        async def second_run() -> bool:
            return len(await runs()) >= 2

        await wait_for(second_run, timeout=8, message="the next fire after the sweep ended")
        done, *_ = await runs()
        assert done["state"] == "completed" and done["result"]["failing"] == 1
        await w.daemon.engine.remove_repeat(QUEUE, SWEEP_JOB_ID)


async def test_stopping_the_daemon_ends_a_spread_sweep_at_once(w: World) -> None:
    ids = [f"{n:024x}" for n in range(30, 60)]
    early = [i for i in ids if offset_fraction(i) < 0.01]
    assert not early  # nobody is due in the first 0.6 s of the minute below
    for iid in ids:
        await w.integration("google", integration_id=iid, refresh=False)
    added = await w.daemon.engine.add(QUEUE, {"spread": True, "every": 75},
                                      job_id=SWEEP_JOB_ID)
    await wait_for(lambda: w.checker.progress() is not None, message="spread sweep running")
    started = time.monotonic()
    await w.daemon.stop()
    assert time.monotonic() - started < 3  # not the 5 s shutdown timeout, nor the minute
    run = await w.mongo.call(lambda db: db[RUNS].find_one({"_id": ObjectId(added.run_id)}))
    assert run["state"] == "completed"
    assert run["result"]["interrupted"] is True and run["result"]["checked"] < len(ids)
    assert w.api.requests == []


async def test_the_default_schedule_is_registered(w: World) -> None:
    async def scheduled() -> bool:
        return bool(await w.daemon.engine.scheduler.repeats(QUEUE))

    await wait_for(scheduled, message="the health-check repeat")
    [repeat] = await w.daemon.engine.scheduler.repeats(QUEUE)
    assert (repeat.job_id, repeat.schedule, repeat.timezone) == (SWEEP_JOB_ID, "0 */4 * * *",
                                                                 "UTC")
    assert repeat.data == {"spread": True, "cron": "0 */4 * * *", "timezone": "UTC"}
    timeout = w.daemon.registry.get(QUEUE).options.timeout
    assert timeout == 6 * 3600  # 1.5 x the 4-hour gap: a spread sweep is never cut short
