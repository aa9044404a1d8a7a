"""File indexing's alert rule (added by `register`).

| rule                | true when                                                       |
|---------------------|-----------------------------------------------------------------|
| `file_sync_failing` | a project's passes have failed (no success since) for longer than |
|                     | `files.failure_alert_after` seconds; one alert for all of them,   |
|                     | naming the oldest few and their reasons                          |

It reads `mwapjobs_file_index` by its `failingSince` index: two queries whatever the
number of projects.
"""

from __future__ import annotations

from datetime import timedelta

from ...alerts.rules import Check, Condition, Rule, RuleContext, duration
from ...config import FileIndexSettings
from ...storage.files import FileIndexStore

SHOWN = 3


def sync_failing(store: FileIndexStore, settings: FileIndexSettings) -> Rule:
    async def check(ctx: RuleContext) -> list[Condition]:
        limit = settings.failure_alert_after
        before = ctx.now - timedelta(seconds=limit)
        count = await store.count_failing_since(before)
        if not count:
            return []
        oldest = await store.failing_since(before)
        named = "; ".join(
            f"project {d['_id']} (tenant {d.get('tenantId')}) since "
            f"{d['failingSince'].isoformat()}: {(d.get('lastError') or {}).get('message')}"
            for d in oldest[:SHOWN])
        more = f"; and {count - SHOWN} more" if count > SHOWN else ""
        return [Condition("file_sync_failing",
                          f"{count} project(s) have failed to sync for more than "
                          f"{duration(limit)}: {named}{more}")]

    run: Check = check
    return Rule("file_sync_failing", run)
