"""The alert rule of health checks (added to the alert manager by `register`).

| rule                  | true when                                                        |
|-----------------------|------------------------------------------------------------------|
| `health_sweep_missed` | no `health-check` run completed for                               |
|                       | `alerts.health_sweep_missed_intervals` × the health cron's longest |
|                       | gap between fires                                                 |
"""

from __future__ import annotations

from ...alerts.rules import Check, Condition, Rule, RuleContext, duration
from .schedule import QUEUE


def sweep_missed(interval: float) -> Rule:
    """The rule, for a schedule whose fires are at most `interval` seconds apart."""

    async def check(ctx: RuleContext) -> list[Condition]:
        limit = ctx.settings.alerts.health_sweep_missed_intervals * interval
        last = await ctx.runs.last_finished(QUEUE, "completed")
        age = (ctx.now - (last or ctx.started_at)).total_seconds()
        if age <= limit:
            return []
        seen = f"last one finished {last.isoformat()}" if last else "none since start-up"
        return [Condition(
            "health_sweep_missed",
            f"no health sweep completed for {duration(age)} ({seen}; the schedule runs "
            f"every {duration(interval)}, threshold {duration(limit)})",
        )]

    run: Check = check
    return Rule("health_sweep_missed", run)
