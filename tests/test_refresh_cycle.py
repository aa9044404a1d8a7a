"""The refresh cycle's pure decisions (jobs/refresh/cycle.py): tables."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from mwapjobs.config import RefreshSettings
from mwapjobs.jobs.refresh.cycle import Next, after_failure, due_time, next_run

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
SYNC = 60.0


@pytest.mark.parametrize(("error", "expires_in", "expected"), [
    ({"permanent": True}, 3600, Next("nothing")),  # the handler marked it expired already
    ({}, None, Next("nothing")),  # no expiry known: discovery decides
    ({"message": "HTTP 503"}, 3600, Next("retry", SYNC)),
    ({"retryAfter": 300}, 3600, Next("retry", 300.0)),  # the provider's wait, if longer
    ({"retryAfter": 5}, 3600, Next("retry", SYNC)),
    ({}, 30, Next("expire")),  # the next try would come after the expiry
    ({"retryAfter": 600}, 300, Next("expire")),
    ({"deadlineExceeded": True}, 3600, Next("expire")),  # stopped by its deadline
    ({}, -10, Next("expire")),
])
def test_after_a_last_failure(error: dict[str, Any], expires_in: float | None,
                              expected: Next) -> None:
    expires = None if expires_in is None else NOW + timedelta(seconds=expires_in)
    assert after_failure(error, expires, NOW, SYNC) == expected


def test_due_time_is_lead_before_expiry_minus_a_stable_share_of_the_jitter() -> None:
    settings = RefreshSettings(lead=300, jitter=120)
    expires = NOW + timedelta(hours=1)
    times = {i: due_time(f"integration-{i}", expires, settings) for i in range(200)}
    for due in times.values():
        assert expires - timedelta(seconds=420) <= due <= expires - timedelta(seconds=300)
    assert len({t.timestamp() for t in times.values()}) > 150  # spread, not one instant
    assert due_time("integration-7", expires, settings) == times[7]  # stable


DATA = {"integrationId": "i1", "tenantId": "t1", "providerId": "p1", "connection": "old",
        "refusedBefore": True}


@pytest.mark.parametrize(("result", "expected"), [
    ({"expiresAt": "2026-12-01T13:00:00+00:00", "rotated": True, "connection": "new"},
     ({"integrationId": "i1", "tenantId": "t1", "providerId": "p1", "connection": "new"},
      datetime(2026, 12, 1, 13, tzinfo=UTC))),
    ({"skipped": "the integration is revoked"}, None),
    ({"expiresAt": "2026-12-01T13:00:00+00:00"}, None),  # no connection: an older version
    ({"expiresAt": "soon", "connection": "new"}, None),
    ("not a dict", None),
    (None, None),
])
def test_the_run_after_a_completed_one(result: Any, expected: Any) -> None:
    assert next_run({"data": DATA, "result": result}) == expected
