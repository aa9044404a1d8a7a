"""When sweeps run: the repeat that adds them, and where in the interval each probe of a
spread sweep starts. The time arithmetic is pure; `schedule`/`unschedule` write the
repeat (run by the daemon's supervisor once the engine is up, retried while MongoDB
fails)."""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime, timedelta
from typing import Any

from ...config import HealthSettings
from ...engine import Engine, as_utc
from ...triggers import longest_gap, make_trigger

log = logging.getLogger(__name__)

QUEUE = "health-check"
SWEEP_JOB_ID = "sweep"  # one sweep pending or running at a time (the engine's job-id rule)
SPREAD_FRACTION = 0.8  # the last 20 % of the interval is left for stragglers and re-probes


def offset_fraction(integration_id: str) -> float:
    """Where in a spread sweep this integration starts, in [0, 1): fixed per integration."""
    digest = hashlib.sha256(f"mwapjobs-health:{integration_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def sweep_timeout(cron: str, timezone: str) -> float:
    """A sweep's timeout: 1.5 x the longest gap between fires of `cron` (a spread sweep
    lasts most of it), at least an hour; six hours for a cron that does not parse (it
    never fires anyway: `schedule` says so)."""
    try:
        gap = longest_gap(cron, timezone, fires=50)
    except ValueError:
        return 6 * 3600.0
    return max(3600.0, 1.5 * (gap or 3600.0))


def spread_window(data: dict[str, Any], created_at: datetime, now: datetime,
                  settings: HealthSettings) -> float:
    """Seconds over which to spread a sweep's probes: 0 unless `data.spread`, else
    SPREAD_FRACTION of the time until the next fire (`data.every` s after the fire for
    an interval repeat, else the next time of `data.cron`)."""
    if not data.get("spread"):
        return 0.0
    every = data.get("every")
    if isinstance(every, int | float) and not isinstance(every, bool) and every > 0:
        next_fire: datetime | None = as_utc(created_at) + timedelta(seconds=float(every))
    else:
        try:
            trigger = make_trigger(str(data.get("cron") or settings.cron), None,
                                   str(data.get("timezone") or settings.timezone))
        except ValueError:
            return 0.0
        next_fire = trigger.get_next_fire_time(None, now + timedelta(seconds=1))
    if next_fire is None:
        return 0.0
    return max(0.0, (next_fire - now).total_seconds()) * SPREAD_FRACTION


async def schedule(engine: Engine, settings: HealthSettings) -> None:
    """Create or update the sweep's repeat. A bad cron or time zone is logged, not
    retried (the operator must fix the configuration)."""
    try:
        await engine.repeat(QUEUE, {"spread": settings.spread, "cron": settings.cron,
                                    "timezone": settings.timezone},
                            cron=settings.cron, timezone=settings.timezone,
                            job_id=SWEEP_JOB_ID)
    except ValueError as exc:
        log.error("health checks NOT scheduled: health.cron or health.timezone is invalid; "
                  "fix the configuration and restart", extra={"error": str(exc)})
        return
    log.info("health checks scheduled", extra={"cron": settings.cron,
                                               "timezone": settings.timezone,
                                               "spread": settings.spread})


async def unschedule(engine: Engine) -> None:
    """Health checks are off: drop a repeat left from when they were on."""
    if await engine.remove_repeat(QUEUE, SWEEP_JOB_ID):
        log.info("health checks are disabled; removed their schedule")
