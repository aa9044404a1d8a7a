"""What a health-check result means for an integration (jobs/health/decide.py): a table."""

from __future__ import annotations

import pytest

from mwapjobs.jobs.health.decide import Decision, Finding, decide

THRESHOLD = 3

# finding, status now, status a health check set, streak before → decision
TABLE: list[tuple[Finding, str, str | None, int, Decision]] = [
    # Healthy: undo only what a health check did.
    ("healthy", "active", None, 2, Decision("healthy", 0, None)),
    ("healthy", "active", "error", 0, Decision("healthy", 0, None)),  # reconnected meanwhile
    ("healthy", "error", "error", 4, Decision("healthy", 0, "error", "active", ("error",))),
    ("healthy", "expired", "expired", 0,
     Decision("healthy", 0, "expired", "active", ("expired",))),
    ("healthy", "expired", None, 0, Decision("healthy", 0, None)),  # the refresher's: kept
    ("healthy", "error", "expired", 0, Decision("healthy", 0, "expired")),
    ("healthy", "revoked", "revoked", 0, Decision("healthy", 0, "revoked")),  # never undone
    # Failures count up and flip `active` to `error` at the threshold only.
    ("failure", "active", None, 0, Decision("failing", 1, None)),
    ("failure", "active", None, 1, Decision("failing", 2, None)),
    ("failure", "active", None, 2, Decision("failing", 3, None, "error", ("active",))),
    ("failure", "error", "error", 5, Decision("error", 6, "error")),
    ("failure", "expired", None, 5, Decision("failing", 6, None)),
    # A dead token: `expired` and a notification, from `active` or `error` only.
    ("expired", "active", None, 2, Decision("expired", 0, None, "expired",
                                             ("active", "error"), "integration.expired")),
    ("expired", "error", "error", 0, Decision("expired", 0, "error", "expired",
                                               ("active", "error"), "integration.expired")),
    ("expired", "expired", None, 0, Decision("expired", 0, None)),
    ("expired", "revoked", None, 0, Decision("expired", 0, None)),
    ("refresh_refused", "expired", None, 1, Decision("expired", 0, None)),
    # Revocation is final.
    ("revoked", "active", None, 0, Decision("revoked", 0, None, "revoked", None,
                                             "integration.revoked")),
    ("revoked", "revoked", "revoked", 0, Decision("revoked", 0, "revoked")),
    # Skipped: nothing moves, the streak included.
    ("skipped", "active", None, 2, Decision("skipped", 2, None)),
    ("skipped", "error", "error", 3, Decision("skipped", 3, "error")),
]


@pytest.mark.parametrize(("finding", "status", "set_status", "streak", "expected"), TABLE)
def test_decide(finding: Finding, status: str, set_status: str | None, streak: int,
                expected: Decision) -> None:
    assert decide(finding, status, set_status, streak, THRESHOLD) == expected


@pytest.mark.parametrize(("decision", "after"), [
    (Decision("failing", 3, None, "error", ("active",)), Decision("error", 3, "error")),
    (Decision("healthy", 0, "error", "active", ("error",)), Decision("healthy", 0, None)),
    (Decision("expired", 0, None, "expired", ("active", "error"), "integration.expired"),
     Decision("expired", 0, "expired", notify="integration.expired")),
    (Decision("revoked", 0, None, "revoked", None, "integration.revoked"),
     Decision("revoked", 0, "revoked", notify="integration.revoked")),
    (Decision("skipped", 2, None), Decision("skipped", 2, None)),
])
def test_a_written_change_is_what_our_notes_remember(decision: Decision,
                                                     after: Decision) -> None:
    assert decision.written() == after
