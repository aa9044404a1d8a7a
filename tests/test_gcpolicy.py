"""The garbage-collection policy (mwapjobs/gcpolicy.py): no automatic full collection
while a daemon runs; full ones when calm, or at the latest after MAX_INTERVAL."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator

import pytest

from mwapjobs import gcpolicy
from mwapjobs.gcpolicy import CALM_CPU, CALM_INTERVAL, MAX_INTERVAL, THAW_EVERY
from mwapjobs.supervisor import Supervisor

BUSY = 1.0  # a core


@pytest.mark.parametrize(("since_full", "cpu", "fulls", "step"), [
    (0.0, 0.0, 0, "wait"),                              # just collected
    (CALM_INTERVAL - 1, 0.0, 0, "wait"),                # calm, but not due yet
    (CALM_INTERVAL, 0.0, 0, "collect"),                 # calm and due
    (CALM_INTERVAL, CALM_CPU, 0, "collect"),
    (CALM_INTERVAL, BUSY, 0, "wait"),                   # a burst under way: later
    (MAX_INTERVAL - 1, BUSY, 0, "wait"),
    (MAX_INTERVAL, BUSY, 0, "collect"),                 # busy for too long: now anyway
    (CALM_INTERVAL, 0.0, THAW_EVERY - 1, "thaw-and-collect"),  # every THAW_EVERY-th
    (CALM_INTERVAL, 0.0, THAW_EVERY, "collect"),
    (MAX_INTERVAL, BUSY, 2 * THAW_EVERY - 1, "thaw-and-collect"),
])
def test_decide(since_full: float, cpu: float, fulls: int, step: str) -> None:
    assert gcpolicy.decide(since_full, cpu, fulls) == step


@pytest.fixture
async def policy() -> AsyncIterator[Supervisor]:
    before = gc.get_threshold()
    tasks = Supervisor()
    release = gcpolicy.install(tasks)
    yield tasks
    await tasks.stop()
    release()
    release()  # once is enough: a second call gives nothing back twice
    assert gc.get_threshold() == before
    gc.unfreeze()


async def test_a_running_daemon_leaves_no_automatic_full_collection(
        policy: Supervisor) -> None:
    assert gc.get_threshold()[2] == gcpolicy.NO_AUTOMATIC_FULL
    assert gc.get_threshold()[0] >= gcpolicy.YOUNG_THRESHOLD  # not a collection per claim
    assert gc.get_threshold()[1] <= gcpolicy.MIDDLE_THRESHOLD
    other = Supervisor()
    release = gcpolicy.install(other)  # a second daemon in the same process
    await other.stop()
    release()  # ... stopped: the first one still runs
    assert gc.get_threshold()[2] == gcpolicy.NO_AUTOMATIC_FULL
    fulls = gc.get_stats()[2]["collections"]
    garbage = [[i] for i in range(200_000)]  # far past the default thresholds
    del garbage
    assert gc.get_stats()[2]["collections"] == fulls


async def test_a_tick_when_due_collects_cycles_and_freezes_the_survivors(
        policy: Supervisor, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="mwapjobs.gcpolicy")
    await gcpolicy.tick()  # just installed: nothing due
    assert not caplog.records
    monkeypatch.setattr(gcpolicy, "CALM_INTERVAL", 0.0)
    monkeypatch.setattr(gcpolicy, "CALM_CPU", float("inf"))

    class Cycle:
        def __init__(self) -> None:
            self.me = self

    cycles = [Cycle() for _ in range(1000)]
    gc.collect(1)  # they survive a young collection: in generation 2 now
    del cycles  # garbage only a full collection finds
    survivor = [object() for _ in range(100)]
    assert any(o is survivor for o in gc.get_objects())  # a collection would scan it
    await gcpolicy.tick()
    [record] = caplog.records
    assert record.freed >= 1000  # type: ignore[attr-defined]
    # Frozen: in no generation any more, so no collection scans it again.
    assert not any(o is survivor for o in gc.get_objects())
