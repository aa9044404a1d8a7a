"""One leader at a time (leadership.py, storage/leases.py): taking, renewing, losing and
handing over the lease; only the leader runs leader-only work; a follower's repeat is
fired by the leader; alert state carries over to the next leader."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

import pytest

from mwapjobs.alerts import AlertManager
from mwapjobs.alerts.rules import Condition, Rule, RuleContext
from mwapjobs.config import EngineSettings
from mwapjobs.engine import Engine, utcnow
from mwapjobs.leadership import LEASE, Leadership
from mwapjobs.queues import Job, QueueRegistry
from mwapjobs.storage.leases import LeaseStore
from mwapjobs.storage.mongo import Mongo
from mwapjobs.storage.names import RUNS
from tests.conftest import TEST_SIGNING_KEY, make_settings, wait_for


def leader(mongo: Mongo, name: str, ttl: float = 30.0) -> Leadership:
    return Leadership(LeaseStore(mongo), name, ttl, utcnow)


async def test_one_instance_takes_the_lease_and_the_others_wait(mongo: Mongo) -> None:
    a, b, c = (leader(mongo, n) for n in "abc")
    for x in (a, b, c):
        await x.step()
    assert [x.leading for x in (a, b, c)] == [True, False, False]
    await b.step()  # asking again changes nothing while a renews
    await a.step()
    assert a.leading and not b.leading
    held = await LeaseStore(mongo).holder(LEASE)
    assert held is not None and held["lockedBy"] == "a" and held["fence"] == 1


async def test_followers_look_every_second_and_the_leader_renews_every_third_of_its_lease(
        mongo: Mongo) -> None:
    """`tick` is the engine's loop: a follower asks at every tick (a freed lease is taken
    within `poll_every`), the leader writes only once `renew_every` has passed."""
    class Counting(LeaseStore):
        renewals = 0

        async def renew(self, *args: Any) -> bool:
            Counting.renewals += 1
            return await super().renew(*args)

    a = Leadership(Counting(mongo), "a", 30.0, utcnow)
    b = leader(mongo, "b")
    assert a.poll_every == 1.0 and a.renew_every == 10.0
    assert leader(mongo, "short", ttl=3.0).poll_every == 0.5  # two looks per renewal
    await a.tick()
    await b.tick()
    assert a.leading and not b.leading
    for _ in range(3):
        await a.tick()
    assert Counting.renewals == 0  # not due yet
    a._renewed_at -= a.renew_every
    await a.tick()
    assert Counting.renewals == 1 and a.leading
    await a.resign()
    await b.tick()  # the next look takes the freed lease
    assert b.leading


async def test_a_graceful_stop_hands_the_lease_over_at_once(mongo: Mongo) -> None:
    a, b = leader(mongo, "a"), leader(mongo, "b")
    await a.step()
    await a.resign()
    assert not a.leading
    await b.step()
    assert b.leading and b.fence == 2  # a new holder, a new fence


async def test_a_graceful_stop_frees_the_lease_before_the_leaders_work_has_ended(
        mongo: Mongo) -> None:
    """Stopping the clock can wait on MongoDB for seconds (its pass is on the wire): the
    next instance must not wait for it. The stopping one no longer leads meanwhile, and
    its leader loops were stopped before the lease was freed."""
    a, b = leader(mongo, "a"), leader(mongo, "b")
    clock_stopped = asyncio.Event()

    async def slow_stop() -> None:
        await clock_stopped.wait()

    async def nothing() -> None:
        pass

    loop_ended = asyncio.Event()

    async def leader_loop() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            loop_ended.set()

    a.on_change(nothing, slow_stop)
    a.keep("leader-loop", leader_loop)
    await a.step()
    await asyncio.sleep(0)  # the loop is running
    resigning = asyncio.create_task(a.resign())
    await wait_for(lambda: not a.leading)

    async def b_took_it() -> bool:
        await b.step()
        return b.leading

    await wait_for(b_took_it, 5, message="b to take the freed lease")
    assert not resigning.done() and not a.leading  # a's clock is still stopping
    assert loop_ended.is_set()  # but no leader loop of a's runs beside b's
    clock_stopped.set()
    await resigning
    assert b.leading and not a.leading


async def test_a_leader_loops_slow_clean_up_does_not_hold_the_lease(mongo: Mongo) -> None:
    """A leader loop's clean-up can wait for seconds (a change stream's close waits for
    its getMore in flight): the loop is cancelled before the lease is freed, so it does
    no leader work after, and the next instance takes the lease without waiting for
    the clean-up; `resign` returns once it has ended."""
    a, b = leader(mongo, "a"), leader(mongo, "b")
    cleaning, cleaned = asyncio.Event(), asyncio.Event()
    steps = 0

    async def follower() -> None:
        nonlocal steps
        try:
            while True:
                steps += 1
                await asyncio.sleep(0.01)
        finally:
            cleaning.set()
            await cleaned.wait()  # closing its stream

    a.keep("follower", follower)
    await a.step()
    await wait_for(lambda: steps > 2, message="the leader loop at work")
    resigning = asyncio.create_task(a.resign())
    await wait_for(cleaning.is_set, message="the loop cancelled")
    worked = steps

    async def b_took_it() -> bool:
        await b.step()
        return b.leading

    await wait_for(b_took_it, 5, message="b to take the freed lease")
    assert not resigning.done()  # a's loop is still cleaning up
    assert steps == worked  # and did no more work once cancelled
    cleaned.set()
    await asyncio.wait_for(resigning, 5)
    assert b.leading and not a.leading


async def test_a_stopping_instance_never_takes_the_lease_again_while_it_drains(
        mongo: Mongo) -> None:
    """The renewal loop keeps ticking during a drain: after `resign` its steps must not
    take the freed lease back (the next instance would wait a whole lease for a process
    that is exiting), not even a step that was asking when `resign` came."""
    a, b = leader(mongo, "a"), leader(mongo, "b")
    await a.step()
    await a.resign()
    await a.step()  # the loop ticks once more while running jobs drain
    assert not a.leading
    held = await LeaseStore(mongo).holder(LEASE)
    assert held is not None and held["lockUntil"].timestamp() == 0  # still free
    await b.step()
    assert b.leading and b.fence == 2
    await b.resign()

    class Slow(LeaseStore):
        async def acquire(self, name: str, owner: str, now: Any, ttl: float) -> int | None:
            fence = await super().acquire(name, owner, now, ttl)
            await c.resign()  # the stop comes while the acquire is on its way
            return fence

    c = Leadership(Slow(mongo), "c", 30.0, utcnow)
    await c.step()
    assert not c.leading and c.changes == 0
    held = await LeaseStore(mongo).holder(LEASE)
    assert held is not None and held["lockedBy"] == "c" and held["lockUntil"].timestamp() == 0


async def test_a_paused_leader_stops_by_its_own_clock_and_cannot_renew_after_a_takeover(
        mongo: Mongo) -> None:
    a, b = leader(mongo, "a", ttl=1.0), leader(mongo, "b", ttl=1.0)
    await a.step()
    await b.step()
    assert a.leading and not b.leading
    # a is "paused" (no renewal) past its lease: it knows without asking the database.
    await wait_for(lambda: not a.leading, timeout=3, message="a's lease ran out by its clock")
    await wait_for(lambda: _step_and_lead(b), timeout=5, message="b took the lease over")
    await a.step()  # a wakes up: its fence is stale, it does not touch b's lease
    assert not a.leading and b.leading
    held = await LeaseStore(mongo).holder(LEASE)
    assert held is not None and held["lockedBy"] == "b" and held["fence"] == b.fence


async def _step_and_lead(x: Leadership) -> bool:
    await x.step()
    return x.leading


async def test_leader_only_loops_run_on_the_leader_and_stop_when_it_loses(
        mongo: Mongo) -> None:
    a, b = leader(mongo, "a", ttl=1.0), leader(mongo, "b", ttl=1.0)
    ran: dict[str, int] = {"a": 0, "b": 0}

    def counter(name: str) -> Any:
        async def step() -> None:
            ran[name] += 1
        return step

    a.every("work", 0.05, counter("a"), first=0.0)
    b.every("work", 0.05, counter("b"), first=0.0)
    await a.step()
    await b.step()
    await wait_for(lambda: ran["a"] >= 3, message="the leader's loop ran")
    assert ran["b"] == 0
    await a.abandon()  # killed: the lease stays until it runs out
    stopped_at = ran["a"]
    await wait_for(lambda: _step_and_lead(b), timeout=5, message="b leads")
    await wait_for(lambda: ran["b"] >= 3, message="the new leader's loop ran")
    assert ran["a"] == stopped_at
    await b.resign()


async def test_a_repeat_set_on_a_follower_is_fired_by_the_leader(mongo: Mongo) -> None:
    fired: list[str] = []

    async def handler(job: Job) -> None:
        fired.append(job.run_id)

    def engine() -> Engine:
        registry = QueueRegistry()
        registry.register("tick", handler)
        return Engine(mongo, registry, EngineSettings(sweep_interval=0.5),
                      signing_key=TEST_SIGNING_KEY)

    a, b = engine(), engine()
    await a.start()
    await b.start()
    try:
        assert a.leadership.leading and not b.leadership.leading
        assert a.scheduler.clock_running and not b.scheduler.clock_running
        repeat = await b.repeat("tick", {}, every=1, job_id="every-second")
        assert repeat.next_run_at is not None
        assert [r.job_id for r in await a.scheduler.repeats("tick")] == ["every-second"]
        # The leader's clock looks at the store at least every MAX_WAIT (10) seconds.
        await wait_for(lambda: len(fired) >= 2, timeout=20, message="the leader fired it")
        slots = await mongo.call(lambda db: db[RUNS].distinct("slot", {"queue": "tick"}))
        count = await mongo.call(lambda db: db[RUNS].count_documents({"queue": "tick"}))
        assert len(slots) == count  # never twice for one occurrence
        assert await b.remove_repeat("tick", "every-second")
        assert await a.scheduler.repeats("tick") == []
    finally:
        await b.stop(1)
        await a.stop(1)


class Flag:
    def __init__(self) -> None:
        self.on = True

    async def check(self, ctx: RuleContext) -> list[Condition]:
        return [Condition("demo_rule", "it is on")] if self.on else []


@pytest.mark.parametrize("cooldown", [3600])
async def test_the_next_leader_carries_the_alert_state_on(mongo: Mongo, cooldown: int) -> None:
    flag = Flag()
    settings = make_settings(alerting_enabled=True, alerts={"cooldown": cooldown})
    terms: dict[str, int | None] = {"a": 1, "b": None}  # the fence while leading

    def manager(name: str) -> AlertManager:
        return AlertManager(settings, mongo, QueueRegistry(), channels=[],
                            rules=[Rule("demo_rule", flag.check)],
                            term=lambda: terms[name])

    a, b = manager("a"), manager("b")
    assert [m.text for m in await a.evaluate()] == ["[mwapjobs] FIRING: demo_rule: it is on"
                                                      "\nRunbook: docs/runbooks/demo_rule.md"]
    assert await b.evaluate() == []  # a follower checks nothing
    terms.update(a=None, b=2)  # a dies; b leads
    assert await b.evaluate() == []  # already announced, within the cool-down: quiet
    flag.on = False
    assert [m.text for m in await b.evaluate()] == ["[mwapjobs] RESOLVED: demo_rule"]
    terms.update(a=3, b=None)
    assert await a.evaluate() == []  # resolved already: nothing more to say


async def test_time_to_lead_is_bounded_by_the_lease_and_one_renewal(mongo: Mongo) -> None:
    a = leader(mongo, "a", ttl=1.5)
    b = leader(mongo, "b", ttl=1.5)
    await a.step()
    await b.step()
    await a.abandon()
    killed = time.monotonic()
    while not b.leading:
        await asyncio.sleep(b.renew_every)  # b's own renewal cadence, as in the engine
        await b.step()
    took = time.monotonic() - killed
    assert took <= a.ttl + b.renew_every + 0.5, took
    assert timedelta(seconds=took) > timedelta(0)
