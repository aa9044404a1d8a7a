"""Alert rules: conditions checked every `alerts.check_interval` seconds.

Each rule answers one question with a few indexed queries (or none) and
returns the conditions that are true right now, one per subject (a queue,
say). Firing, cool-down and resolving are `notifier.AlertManager`'s job; a
rule only observes. Thresholds come from `[alerts]` in the configuration:

| rule                  | true when                                                        |
|-----------------------|------------------------------------------------------------------|
| `failed_runs`         | more than `failed_runs_threshold` runs of a queue failed within   |
|                       | `failed_runs_window` seconds                                      |
| `refresh_failures`    | at least `refresh_failure_min` `token-refresh` runs failed within |
|                       | the same window and failures / (failures + successes) exceeds     |
|                       | `refresh_failure_rate`                                            |
| `backlog`             | the oldest waiting run of a (not paused) queue has waited more    |
|                       | than `backlog_age` seconds                                        |
| `health_sweep_missed` | no `health-check` run completed for `health_sweep_missed_intervals`|
|                       | × the health cron's interval (only with health checks enabled)    |
| `mongodb_down`        | MongoDB has been unreachable for more than `mongodb_down_for` s;  |
|                       | needs no database, so it works during the outage it reports       |
| `provider_on_hold`    | a provider's token endpoint refuses our configuration of it (wrong |
|                       | client secret, token URL, TLS): its refreshes wait; one alert per  |
|                       | provider, naming the error and the tokens that expire meanwhile    |
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from ..config import Settings
from ..scheduler import make_trigger
from ..storage.alerts import AlertStore
from ..storage.names import SCHEDULER_JOBS, SCHEDULER_QUARANTINE
from ..storage.providers import ProviderHolds

REFRESH_QUEUE = "token-refresh"
HEALTH_QUEUE = "health-check"


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
    store: AlertStore
    settings: Settings
    queues: list[str]
    is_paused: Callable[[str], bool]
    now: datetime
    monotonic: float
    mongo_down_since: float | None
    mongo_error: str | None
    started_at: datetime
    health_interval: float | None
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
        n = await ctx.store.count_finished(queue, "failed", since)
        if n > a.failed_runs_threshold:
            out.append(Condition(
                "failed_runs",
                f"{n} runs failed in the last {duration(a.failed_runs_window)} "
                f"(threshold: more than {a.failed_runs_threshold})",
                f"queue {queue}",
            ))
    return out


async def refresh_failures(ctx: RuleContext) -> list[Condition]:
    if REFRESH_QUEUE not in ctx.queues:
        return []
    a = ctx.settings.alerts
    since = ctx.now - timedelta(seconds=a.failed_runs_window)
    failed = await ctx.store.count_finished(REFRESH_QUEUE, "failed", since)
    if failed < a.refresh_failure_min:
        return []
    completed = await ctx.store.count_finished(REFRESH_QUEUE, "completed", since)
    rate = failed / (failed + completed)
    if rate <= a.refresh_failure_rate:
        return []
    return [Condition(
        "refresh_failures",
        f"{failed} of {failed + completed} token refreshes failed in the last "
        f"{duration(a.failed_runs_window)} ({rate:.0%}; threshold: above "
        f"{a.refresh_failure_rate:.0%} with at least {a.refresh_failure_min} failures)",
    )]


async def backlog(ctx: RuleContext) -> list[Condition]:
    limit = ctx.settings.alerts.backlog_age
    out = []
    for queue in ctx.queues:
        if ctx.is_paused(queue):
            continue  # a paused queue fills up on purpose
        oldest = await ctx.store.oldest_waiting(queue)
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


async def health_sweep_missed(ctx: RuleContext) -> list[Condition]:
    interval = ctx.health_interval
    if not ctx.settings.health.enabled or HEALTH_QUEUE not in ctx.queues or not interval:
        return []
    limit = ctx.settings.alerts.health_sweep_missed_intervals * interval
    last = await ctx.store.last_finished(HEALTH_QUEUE, "completed")
    age = (ctx.now - (last or ctx.started_at)).total_seconds()
    if age <= limit:
        return []
    seen = f"last one finished {last.isoformat()}" if last else "none since start-up"
    return [Condition(
        "health_sweep_missed",
        f"no health sweep completed for {duration(age)} ({seen}; the schedule runs every "
        f"{duration(interval)}, threshold {duration(limit)})",
    )]


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


async def provider_on_hold(ctx: RuleContext) -> list[Condition]:
    """Providers on hold (storage/providers.py): what the token endpoint said, since when,
    and how many access tokens of the provider expire while nothing refreshes them."""
    if REFRESH_QUEUE not in ctx.queues:
        return []
    # AlertStore has no public Mongo handle yet; the hold state is its own store's.
    holds = ProviderHolds(ctx.store.mongo)
    out = []
    for doc in await holds.all():
        hold = doc.get("hold") or {}
        provider_id = str(doc["_id"])
        since = hold.get("since")
        since = _utc(since) if isinstance(since, datetime) else ctx.now
        risk = await holds.tokens_at_risk(provider_id, since, ctx.now)
        name = doc.get("name")
        subject = f"provider {name} ({provider_id})" if name else f"provider {provider_id}"
        parts = [f"{hold.get('error')}: {hold.get('reason')}",
                 f"on hold since {since.isoformat(timespec='seconds')} "
                 f"({duration((ctx.now - since).total_seconds())}); no tenant's status "
                 "changes, its token refreshes wait"]
        if risk.expiring and risk.earliest is not None:
            parts.append(f"{risk.expiring} access token{'s' if risk.expiring != 1 else ''} "
                         "of this provider expire while it stays on hold, the earliest at "
                         f"{risk.earliest.isoformat(timespec='seconds')} (in "
                         f"{duration((risk.earliest - ctx.now).total_seconds())})")
        if risk.expired:
            parts.append(f"{risk.expired} expired already during the hold")
        next_probe = hold.get("nextProbeAt")
        probe = (f", or at the next re-probe ({_utc(next_probe).isoformat(timespec='seconds')})"
                 if isinstance(next_probe, datetime) else "")
        parts.append("fix the provider in cloudProviders: refreshes resume as soon as its "
                     f"document changes{probe}")
        out.append(Condition("provider_on_hold", "; ".join(parts), subject))
    return out


async def provider_url_changed(ctx: RuleContext) -> list[Condition]:
    """A provider's tokenUrl, healthCheckUrl or apiBaseUrl points somewhere new (seen by
    discovery): its secrets now go there. True for one cool-down after the change, so it
    is announced once."""
    since = ctx.now - timedelta(seconds=ctx.settings.alerts.cooldown)
    out = []
    for doc in await ProviderHolds(ctx.store.mongo).url_changes(since):
        name = doc.get("name")
        provider_id = str(doc["_id"])
        subject = f"provider {name} ({provider_id})" if name else f"provider {provider_id}"
        moves = "; ".join(f"{c.get('field')} now {c.get('to') or '(none)'} "
                          f"(was {c.get('from') or '(none)'})"
                          for c in doc.get("urlChanges") or [])
        out.append(Condition("provider_url_changed",
                             f"{moves}: if nobody here changed it, the provider's secrets "
                             "may be going to someone else", subject))
    return out


async def scheduler_documents_rejected(ctx: RuleContext) -> list[Condition]:
    """Documents in the scheduler's collection that mwapjobs did not sign were moved to
    the quarantine (storage/jobstore.py): someone wrote to the job store."""
    count, newest = await ctx.store.quarantined()
    if not count:
        return []
    when = newest.isoformat(timespec="seconds") if newest else "unknown"
    return [Condition(
        "scheduler_documents_rejected",
        f"{count} document{'s' if count != 1 else ''} in {SCHEDULER_JOBS} were not signed "
        f"by mwapjobs and were never read (the latest at {when}); they are in "
        f"{SCHEDULER_QUARANTINE}: find out who wrote them, then delete them")]


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def default_rules() -> list[Rule]:
    return [
        Rule("mongodb_down", mongodb_down, needs_db=False),
        Rule("failed_runs", failed_runs),
        Rule("refresh_failures", refresh_failures),
        Rule("backlog", backlog),
        Rule("health_sweep_missed", health_sweep_missed),
        Rule("alert_channel_failing", alert_channel_failing, needs_db=False),
        Rule("provider_on_hold", provider_on_hold),
        Rule("provider_url_changed", provider_url_changed),
        Rule("scheduler_documents_rejected", scheduler_documents_rejected),
    ]


def cron_interval(cron: str, timezone: str = "UTC", now: datetime | None = None,
                  fires: int = 200, horizon: float = 8 * 86400.0) -> float:
    """The longest gap between consecutive fires of `cron` over the next `fires` fires
    or `horizon` seconds, whichever comes first: the schedule's interval, and for an
    irregular one (weekdays only, say) its worst case."""
    trigger = make_trigger(cron, None, timezone)
    start = now or datetime.now(UTC)
    previous = trigger.get_next_fire_time(None, start)
    longest = 0.0
    for _ in range(fires):
        if previous is None:
            break
        following = trigger.get_next_fire_time(previous, previous)
        if following is None:
            break
        longest = max(longest, (following - previous).total_seconds())
        if (following - start).total_seconds() > horizon:
            break
        previous = following
    return longest
