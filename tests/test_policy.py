"""The engine's pure decisions, as tables: when to retry, and what a crash means."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from mwapjobs.policy import StallVerdict, retry_time, stall_verdict
from mwapjobs.queues import Backoff

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
FIXED = Backoff(type="fixed", delay=10.0, jitter=0.0)
EXP = Backoff(type="exponential", delay=5.0, jitter=0.0, max_delay=60.0)


def at(seconds: float) -> datetime:
    return NOW + timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("attempt", "max_attempts", "backoff", "retry_after", "deadline", "expected"),
    [
        (1, 3, FIXED, None, None, at(10)),
        (2, 3, FIXED, None, None, at(10)),
        (3, 3, FIXED, None, None, None),  # attempts used up
        (1, 5, EXP, None, None, at(5)),
        (2, 5, EXP, None, None, at(10)),
        (4, 5, EXP, None, None, at(40)),
        (4, 9, Backoff(delay=5.0, jitter=0.0, max_delay=30.0), None, None, at(30)),  # capped
        (1, 3, FIXED, 120.0, None, at(120)),  # the provider asked for longer
        (1, 3, FIXED, 2.0, None, at(10)),  # never sooner than the backoff
        (1, 3, FIXED, None, at(11), at(10)),  # fits before the deadline
        (1, 3, FIXED, None, at(10), None),  # would land on the deadline
        (1, 3, FIXED, 60.0, at(30), None),  # Retry-After past the deadline
    ],
)
def test_retry_time(attempt: int, max_attempts: int, backoff: Backoff,
                    retry_after: float | None, deadline: datetime | None,
                    expected: datetime | None) -> None:
    assert retry_time(attempt=attempt, max_attempts=max_attempts, backoff=backoff, now=NOW,
                      retry_after=retry_after, deadline=deadline) == expected


def test_retry_time_jitter_spreads_around_the_delay() -> None:
    spread = Backoff(type="fixed", delay=10.0, jitter=0.5)
    low = retry_time(attempt=1, max_attempts=3, backoff=spread, now=NOW, rand=lambda: 0.0)
    high = retry_time(attempt=1, max_attempts=3, backoff=spread, now=NOW, rand=lambda: 1.0)
    assert (low, high) == (at(5), at(15))


@pytest.mark.parametrize(
    ("crashes", "stalled", "alone", "limit", "expected"),
    [
        # One crash among others: not blamed, not isolated yet.
        (0, 0, False, 3, StallVerdict("waiting", 1, 0, False)),
        # Present at a second crash: runs alone next time, still not blamed.
        (1, 0, False, 3, StallVerdict("waiting", 2, 0, True)),
        # Alone when its process died: blamed once, and kept alone.
        (0, 0, True, 3, StallVerdict("waiting", 1, 1, True)),
        (2, 1, True, 3, StallVerdict("waiting", 3, 2, True)),
        (3, 3, True, 3, StallVerdict("failed", 4, 4, False)),  # blamed more than the limit
        (5, 1, False, 1, StallVerdict("waiting", 6, 1, True)),  # crowds never count
        (0, 1, True, 1, StallVerdict("failed", 1, 2, False)),
        (0, 0, True, 0, StallVerdict("failed", 1, 1, False)),  # limit 0: the first blame fails it
    ],
)
def test_stall_verdict(crashes: int, stalled: int, alone: bool, limit: int,
                       expected: StallVerdict) -> None:
    assert stall_verdict(crashes=crashes, stalled=stalled, alone=alone, limit=limit) == expected


def test_a_job_that_kills_its_process_fails_within_a_few_crashes_its_neighbours_never() -> None:
    """Replay: a poison run is claimed with others twice, then alone each time."""
    poison = {"crashes": 0, "stalled": 0}
    neighbour = {"crashes": 0, "stalled": 0}
    verdict = None
    for crash in range(1, 10):
        isolated = crash > 2
        verdict = stall_verdict(**poison, alone=isolated, limit=3)
        poison = {"crashes": verdict.crashes, "stalled": verdict.stalled}
        if crash <= 2:  # the neighbour shared the first two crashes, then ran alone fine
            n = stall_verdict(**neighbour, alone=False, limit=3)
            neighbour = {"crashes": n.crashes, "stalled": n.stalled}
            assert n.state == "waiting"
        if verdict.state == "failed":
            break
    assert verdict is not None and verdict.state == "failed"
    assert crash == 6  # two crashes in company, then four alone
    assert neighbour == {"crashes": 2, "stalled": 0}
