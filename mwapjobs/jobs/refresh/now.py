"""Refresh one integration now: what the manual endpoint, the health sweep and any later
job call. Returns the engine's handle; `await added.settled(timeout)` waits for the
outcome (or for a postponement while the provider is on hold)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ...engine import Added, Engine, as_utc
from .runs import MANUAL_PRIORITY, QUEUE, job_id, run_data


async def refresh_now(engine: Engine, integration: dict[str, Any], now: datetime) -> Added:
    """The integration's refresh run, due now and first in line (it replaces a pending
    one, so it never races the scheduled refresh), with the token's expiry as deadline
    while that is still ahead."""
    expires = integration.get("tokenExpiresAt")
    deadline = as_utc(expires) if isinstance(expires, datetime) else None
    return await engine.add(
        QUEUE, run_data(integration), job_id=job_id(str(integration["_id"])),
        priority=MANUAL_PRIORITY, replace=True,
        deadline=deadline if deadline and deadline > now else None)
