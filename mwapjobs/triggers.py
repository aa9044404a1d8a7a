"""Triggers: when a repeat fires. Pure: no I/O, no database driver, importable by config.

APScheduler 3's trigger classes do the calendar arithmetic; this module adds what
operators expect of a crontab that APScheduler does differently:
- standard crontab weekdays (`0`/`7` = Sunday; APScheduler counts from Monday = 0);
- one fire per wall-clock time when clocks go back (`WallClockCronTrigger`);
- `longest_gap`, the worst-case interval of a schedule (alert thresholds and
  timeouts are multiples of it).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger


class WallClockCronTrigger(CronTrigger):  # type: ignore[misc]
    """A cron trigger that fires once per wall-clock time.

    When clocks go back, 02:30 happens twice; a job "at 02:30" must run once
    that night, not twice. Crons whose hour field is a wildcard ("every hour")
    keep firing in both hours, because there the interval is what counts.
    """

    def get_next_fire_time(self, previous: datetime | None, now: datetime) -> datetime | None:
        candidate: datetime | None = super().get_next_fire_time(previous, now)
        if previous is None or candidate is None or "*" in str(self.fields[5]):
            return candidate
        tz = self.timezone
        if candidate.astimezone(tz).replace(tzinfo=None) == previous.astimezone(tz).replace(
            tzinfo=None
        ):
            return self.get_next_fire_time(candidate, candidate)
        return candidate


_DAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def _crontab_days(field: str) -> str:
    """Standard crontab weekdays (0 or 7 = Sunday) as names APScheduler reads right.

    APScheduler 3 numbers weekdays from Monday = 0, so "1-5" would mean
    Tuesday to Saturday; names mean the same to both.
    """
    if field == "*":
        return field

    def day(token: str) -> int:
        token = token.lower()[:3]
        if token in _DAY_NAMES:
            return _DAY_NAMES.index(token)
        if not token.isdigit() or int(token) > 7:
            raise ValueError(f"bad day of week {token!r}")
        return int(token)

    days: set[int] = set()
    for item in field.split(","):
        span, _, step = item.partition("/")
        if span == "*":
            low, high = 0, 6
        elif "-" in span:
            first, last = span.split("-", 1)
            low, high = day(first), day(last)
        else:
            low = high = day(span)
            high = 6 if step else high
        days |= {d % 7 for d in range(low, high + 1, int(step) if step else 1)}
    return ",".join(_DAY_NAMES[d] for d in sorted(days))


def make_trigger(cron: str | None, every: float | None, timezone: str) -> BaseTrigger:
    """A cron (standard 5-field crontab) or interval trigger in `timezone`; ValueError
    with an operator's message for a bad definition."""
    if (cron is None) == (every is None):
        raise ValueError("give exactly one of cron and every")
    try:
        tz = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {timezone!r}") from None
    if cron is not None:
        fields = cron.split()
        try:
            if len(fields) != 5:
                raise ValueError("expected 5 fields: minute hour day month day-of-week")
            minute, hour, day, month, weekdays = fields
            return WallClockCronTrigger(
                minute=minute, hour=hour, day=day, month=month,
                day_of_week=_crontab_days(weekdays), timezone=tz,
            )
        except ValueError as exc:
            raise ValueError(f"invalid cron expression {cron!r}: {exc}") from None
    assert every is not None
    if every <= 0:
        raise ValueError("every must be a positive number of seconds")
    return IntervalTrigger(seconds=every, timezone=tz)


def longest_gap(cron: str, timezone: str = "UTC", now: datetime | None = None,
                fires: int = 200, horizon: float = 8 * 86400.0) -> float:
    """The longest gap, in seconds, between consecutive fires of `cron` over the next
    `fires` fires or `horizon` seconds, whichever comes first: the schedule's interval,
    and for an irregular one (weekdays only, say) its worst case."""
    trigger = make_trigger(cron, None, timezone)
    start = now or datetime.now(UTC)
    previous = trigger.get_next_fire_time(None, start)
    longest = 0.0
    for _ in range(fires):
        if previous is None:
            break
        following = trigger.get_next_fire_time(previous, previous + timedelta(microseconds=1))
        if following is None:
            break
        longest = max(longest, (following - previous).total_seconds())
        if (following - start).total_seconds() > horizon:
            break
        previous = following
    return longest
