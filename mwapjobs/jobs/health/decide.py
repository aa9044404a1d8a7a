"""What one health-check result means for an integration. Pure: no I/O, a table in the
tests (tests/test_health_decide.py).

The sweep turns a probe answer into a *finding* (`probes.Verdict` → `Finding`, plus the
refresh-then-probe path), reads the integration's MWAP status and our notes, and asks
`decide` what to do. The answer names the outcome to record, the failure streak, the
status to write (with the backend's conditional filter: the write may be refused when
someone changed the integration meanwhile) and the notification that goes with it;
`Decision.written()` is what holds once that write succeeded.

| finding           | status change (only from)                      | notification        |
|-------------------|------------------------------------------------|---------------------|
| `healthy`         | `expired`/`error` → `active`, only if a health  |                     |
|                   | check set it                                   |                     |
| `failure`         | `active` → `error` at the `failure_threshold`-th| (logged each time)  |
|                   | failure in a row                               |                     |
| `expired`         | `active`/`error` → `expired`                   | integration.expired |
| `refresh_refused` | none: the refresher marked it and notified     |                     |
| `revoked`         | any (but `revoked`) → `revoked`, never undone   | integration.revoked |
| `skipped`         | none, and the streak stays                     |                     |
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

Outcome = Literal["healthy", "failing", "error", "expired", "revoked", "skipped"]
OUTCOMES: tuple[Outcome, ...] = ("healthy", "failing", "error", "expired", "revoked", "skipped")
Finding = Literal["healthy", "failure", "expired", "refresh_refused", "revoked", "skipped"]


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    streak: int  # consecutive failures after this result
    set_status: str | None  # the status our notes say a health check set
    change: str | None = None  # a status to write, conditionally
    only_from: tuple[str, ...] | None = None  # the statuses it may replace (None: any)
    notify: str | None = None  # the notification kind, once the change is written

    def written(self) -> Decision:
        """The decision once its status change was written."""
        if self.change is None:
            return self
        return replace(self, outcome="error" if self.change == "error" else self.outcome,
                       set_status=None if self.change == "active" else self.change,
                       change=None, only_from=None)


def decide(finding: Finding, status: str, set_status: str | None, streak: int,
           threshold: int) -> Decision:
    """`status`: the integration's MWAP status now; `set_status`: what our notes say a
    health check set; `streak`: consecutive failures before this result."""
    if finding == "healthy":
        if status in ("expired", "error") and set_status == status:
            return Decision("healthy", 0, set_status, change="active", only_from=(status,))
        # An `active` integration: whatever we set was undone (a reconnect, say).
        return Decision("healthy", 0, None if status == "active" else set_status)
    if finding == "failure":
        streak += 1
        if streak >= threshold and status == "active":
            return Decision("failing", streak, set_status, change="error",
                            only_from=("active",))
        return Decision("error" if status == "error" else "failing", streak, set_status)
    if finding == "expired":
        if status in ("active", "error"):
            return Decision("expired", 0, set_status, change="expired",
                            only_from=("active", "error"), notify="integration.expired")
        return Decision("expired", 0, set_status)
    if finding == "refresh_refused":
        return Decision("expired", 0, set_status)
    if finding == "revoked":
        if status != "revoked":
            return Decision("revoked", 0, set_status, change="revoked",
                            notify="integration.revoked")
        return Decision("revoked", 0, set_status)
    return Decision("skipped", streak, set_status)
