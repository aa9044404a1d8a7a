"""Alert rules: conditions checked every `alerts.check_interval` seconds.

Each rule answers one question with a few indexed queries (or none) and
returns the conditions that are true right now, one per subject (a queue,
say). Firing, cool-down and resolving are `notifier.AlertManager`'s job; a
rule only observes. Thresholds come from `[alerts]` in the configuration.

The generic rules, for every daemon:

| rule                           | true when                                               |
|--------------------------------|---------------------------------------------------------|
| `mongodb_down`                 | MongoDB has been unreachable for more than               |
|                                | `mongodb_down_for` s; needs no database, so it works     |
|                                | during the outage it reports                             |
| `failed_runs`                  | more than `failed_runs_threshold` runs of a queue failed |
|                                | within `failed_runs_window` seconds                      |
| `backlog`                      | the oldest waiting run of a (not paused) queue has       |
|                                | waited more than `backlog_age` seconds                   |
| `alert_channel_failing`        | a channel's deliveries have failed for a minute (or it   |
|                                | refuses to send a password in clear)                     |
| `scheduler_documents_rejected` | unsigned documents were found in the scheduler's store   |

Jobs add their own (`AlertManager.add_rule`, from their registration): token refresh
adds `refresh_failures`, `provider_on_hold` and `provider_url_changed`
(`jobs/refresh/rules.py`), health checks `health_sweep_missed` (`jobs/health/rules.py`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from ..config import Settings
from ..storage.jobstore import quarantined
from ..storage.mongo import Mongo
from ..storage.names import SCHEDULER_JOBS, SCHEDULER_QUARANTINE
from ..storage.runs import RunStore


@dataclass(frozen=True)
class Condition:
    """A rule that is true now, for one subject (None for process-wide rules)."""

    rule: str
    details: str
    subject: str | None = None

    @property
    def key(self) -> str:
        return f"{self.rule}|{self.subject or ''}"

    @property
    def label(self) -> str:
        """How messages name the alert: `failed_runs (queue demo)`."""
        return self.rule if self.subject is None else f"{self.rule} ({self.subject})"


@dataclass(frozen=True)
class RuleContext:
    """What one evaluation sees: the run history, the database, the settings, now."""

    runs: RunStore
    mongo: Mongo
    settings: Settings
    queues: list[str]
    is_paused: Callable[[str], bool]
    now: datetime
    monotonic: float
    mongo_down_since: float | None
    mongo_error: str | None
    started_at: datetime
    # channel -> (monotonic time its deliveries started failing, the last error)
    channel_failures: dict[str, tuple[float, str]] = field(default_factory=dict)


Check = Callable[[RuleContext], Awaitable[list[Condition]]]


@dataclass(frozen=True)
class Rule:
    name: str
    check: Check
    needs_db: bool = True  # skipped (state kept) while MongoDB is known to be down


def duration(seconds: float) -> str:
    """A short human duration: 45s, 15m, 2h 5m, 3d 4h."""
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m" + (f" {s % 60}s" if s % 60 and s < 600 else "")
    if s < 86400:
        return f"{s // 3600}h" + (f" {s % 3600 // 60}m" if s % 3600 // 60 else "")
    return f"{s // 86400}d" + (f" {s % 86400 // 3600}h" if s % 86400 // 3600 else "")


async def failed_runs(ctx: RuleContext) -> list[Condition]:
    a = ctx.settings.alerts
    since = ctx.now - timedelta(seconds=a.failed_runs_window)
    out = []
    for queue in ctx.queues:
        n = await ctx.runs.count_finished_since(queue, "failed", since)
        if n > a.failed_runs_threshold:
            out.append(Condition(
                "failed_runs",
                f"{n} runs failed in the last {duration(a.failed_runs_window)} "
                f"(threshold: more than {a.failed_runs_threshold})",
                f"queue {queue}",
            ))
    return out


async def backlog(ctx: RuleContext) -> list[Condition]:
    limit = ctx.settings.alerts.backlog_age
    out = []
    for queue in ctx.queues:
        if ctx.is_paused(queue):
            continue  # a paused queue fills up on purpose
        oldest = await ctx.runs.oldest_waiting(queue)
        if oldest is None:
            continue
        age = (ctx.now - oldest).total_seconds()
        if age > limit:
            out.append(Condition(
                "backlog",
                f"the oldest waiting run has waited {duration(age)} "
                f"(threshold: {duration(limit)})",
                f"queue {queue}",
            ))
    return out


async def mongodb_down(ctx: RuleContext) -> list[Condition]:
    since = ctx.mongo_down_since
    if since is None:
        return []
    down_for = ctx.monotonic - since
    if down_for <= ctx.settings.alerts.mongodb_down_for:
        return []
    error = f": {ctx.mongo_error}" if ctx.mongo_error else ""
    return [Condition("mongodb_down", f"MongoDB unreachable for {duration(down_for)}{error}")]


CHANNEL_FAILING_FOR = 60.0  # seconds of failed deliveries before the other channels hear


async def alert_channel_failing(ctx: RuleContext) -> list[Condition]:
    """An alert channel keeps failing (a dead webhook, an SMTP server that offers no
    TLS to send the password over): the other channels say so."""
    out = []
    for name, (since, error) in sorted(ctx.channel_failures.items()):
        failing_for = ctx.monotonic - since
        if failing_for >= CHANNEL_FAILING_FOR or "in clear" in error:
            out.append(Condition("alert_channel_failing",
                                 f"deliveries have failed for {duration(failing_for)}: "
                                 f"{error}", f"channel {name}"))
    return out


async def scheduler_documents_rejected(ctx: RuleContext) -> list[Condition]:
    """Documents in the scheduler's collection that mwapjobs did not sign were moved to
    the quarantine (storage/jobstore.py): someone wrote to the job store."""
    count, newest = await quarantined(ctx.mongo)
    if not count:
        return []
    when = newest.isoformat(timespec="seconds") if newest else "unknown"
    return [Condition(
        "scheduler_documents_rejected",
        f"{count} document{'s' if count != 1 else ''} in {SCHEDULER_JOBS} "
        f"{'were' if count != 1 else 'was'} not signed by mwapjobs and never read (the "
        f"latest at {when}); {'they are' if count != 1 else 'it is'} in "
        f"{SCHEDULER_QUARANTINE}: find out who wrote them, then delete them")]


def default_rules() -> list[Rule]:
    """The rules every daemon checks, whatever jobs it runs."""
    return [
        Rule("mongodb_down", mongodb_down, needs_db=False),
        Rule("failed_runs", failed_runs),
        Rule("backlog", backlog),
        Rule("alert_channel_failing", alert_channel_failing, needs_db=False),
        Rule("scheduler_documents_rejected", scheduler_documents_rejected),
    ]
