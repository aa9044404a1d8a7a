"""The refresh cycle: when an integration is refreshed next, and what a failure leads to.
This is the one place of token refresh's policy; `register` wires it to the engine.

    discovery (new or reconnected integration) ──► token-refresh run, due `lead` s
         ▲ safety net: backend writes, deletions       before tokenExpiresAt
         │                                                   │
         │        ┌──── completed: tokens written ◄──────────┤
         │        └──► the next run, due before the new expiry (`after_success`)
         │                                                   │
         │   failed: the grant is dead (RefreshFailed) ◄─────┤  ► expired + notification
         │   failed: attempts used up on transient errors ◄──┘  ► `after_failure`:
                                                                   try again later, or
                                                                   expired + notification

After a successful write-back the handler returns the next refresh with its result
(`next_refresh`, the engine's `AndThen`), for the tokens just written
(`data.connection`): the engine writes it in the same round trip as the completion, so
the cycle never waits for discovery's next pass; discovery stays as the safety net for
what the backend writes and deletes (and for a run lost to a crash between the token
write and the completion).

The follow-ups of failures are taken off the engine's event path into a small
in-process queue drained by one task.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from ...config import RefreshSettings
from ...engine import Engine, as_utc
from ...queues import AndThen
from ...storage.integrations import IntegrationStore
from .runs import QUEUE, fingerprint, job_id

log = logging.getLogger(__name__)

MAX_FOLLOW_UPS = 100_000  # waiting follow-ups; beyond that discovery catches up


def due_time(integration_id: str, expires_at: datetime, settings: RefreshSettings) -> datetime:
    """When an integration's refresh is due: `refresh.lead` s before its token expires,
    earlier by a stable share of `refresh.jitter` (a hash of its id, so every pass and
    every follow-up computes the same time, and a fleet does not refresh at once)."""
    digest = hashlib.sha256(integration_id.encode()).digest()
    spread = int.from_bytes(digest[:4], "big") / 0xFFFFFFFF * settings.jitter
    return as_utc(expires_at) - timedelta(seconds=settings.lead + spread)


@dataclass(frozen=True)
class Next:
    """What follows a run that failed for good: another try after `delay` s, marking the
    integration expired, or nothing (the handler has dealt with it)."""

    action: Literal["retry", "expire", "nothing"]
    delay: float = 0.0


def after_failure(error: dict[str, Any], expires_at: datetime | None, now: datetime,
                  sync_interval: float) -> Next:
    """After a refresh run's last failed attempt. Pure: a table in the tests.

    A permanent failure was handled by the handler (the grant is dead: expired). Else
    keep trying while the token is valid, a new run after `sync_interval` (or the
    provider's Retry-After if longer); once the token would expire before that try (or
    the run's deadline was the reason it stopped), it cannot be saved in time."""
    if error.get("permanent") or expires_at is None:
        return Next("nothing")
    wait = max(sync_interval, float(error.get("retryAfter") or 0))
    if not error.get("deadlineExceeded") and as_utc(expires_at) > now + timedelta(seconds=wait):
        return Next("retry", wait)
    return Next("expire")


def next_run(run: dict[str, Any]) -> tuple[dict[str, Any], datetime] | None:
    """The data and token expiry of the run after a completed one, or None when it did not
    write tokens (skipped: deleted, revoked, disconnected, or newer tokens kept)."""
    result = run.get("result")
    data = run.get("data")
    if not isinstance(result, dict) or not isinstance(data, dict):
        return None
    connection, expires = result.get("connection"), result.get("expiresAt")
    if not isinstance(connection, str) or not isinstance(expires, str):
        return None
    try:
        expires_at = as_utc(datetime.fromisoformat(expires))
    except ValueError:
        return None
    follow = {k: v for k, v in data.items() if k != "refusedBefore"}
    follow["connection"] = connection
    return follow, expires_at


def next_refresh(data: dict[str, Any], result: dict[str, Any], settings: RefreshSettings,
                 now: datetime) -> AndThen | dict[str, Any]:
    """What the handler returns after a refresh with `result`: with the next run, due
    before the new expiry, when it wrote tokens; else `result` alone. Pure."""
    follow = next_run({"data": data, "result": result})
    if follow is None:
        return result
    next_data, expires_at = follow
    integration_id = str(next_data.get("integrationId"))
    due = due_time(integration_id, expires_at, settings)
    return AndThen(result, next_data, job_id(integration_id), max(due, now), expires_at)


async def give_up(store: IntegrationStore, integration: dict[str, Any], reason: str,
                  now: datetime) -> None:
    """The tenant's grant is dead: remember which refresh token was refused (discovery then
    leaves it alone), and mark the integration `expired`, which invites the tenant to
    reconnect (an `active` one with a dead token would block the backend's reconnect)."""
    integration_id = str(integration["_id"])
    await store.record_refresh_failure(
        integration_id, fingerprint(integration.get("refreshToken")), reason, now)
    if await store.set_status(integration, "expired", now):
        await store.notifications.record("integration.expired", integration, reason, now)
    log.warning("refresh failed for good; integration marked expired",
                extra={"integrationId": integration_id,
                       "tenantId": integration.get("tenantId"), "reason": reason})


class RefreshCycle:
    """Listens to the token-refresh queue's events and carries out the follow-ups."""

    def __init__(self, engine: Engine, store: IntegrationStore, settings: RefreshSettings,
                 clock: Callable[[], datetime]) -> None:
        self.engine = engine
        self.store = store
        self.settings = settings
        self.clock = clock
        self._pending: asyncio.Queue[dict[str, Any]] = asyncio.Queue(
            MAX_FOLLOW_UPS)

    def on_event(self, event: str, run: dict[str, Any]) -> None:
        """An engine event (synchronous: queued, handled by `run`)."""
        if run.get("queue") != QUEUE or event != "failed":
            return
        try:
            self._pending.put_nowait(run)
        except asyncio.QueueFull:
            log.warning("refresh follow-ups are backing up; discovery schedules the rest",
                        extra={"runId": run.get("runId")})

    async def run(self) -> None:
        """Carry out follow-ups one by one, for as long as the engine runs."""
        while True:
            run = await self._pending.get()
            try:
                await self.follow_failure(run.get("data") or {}, run.get("error") or {})
            except Exception as exc:  # discovery's next pass repairs the schedule
                log.warning("refresh follow-up failed; discovery will catch up",
                            extra={"runId": run.get("runId"), "event": "failed",
                                   "error": f"{type(exc).__name__}: {exc}"[:300]})

    async def follow_failure(self, data: dict[str, Any], error: dict[str, Any]) -> None:
        """A run failed for good: try again later, or mark the integration expired."""
        if error.get("permanent"):
            return
        integration = await self.store.get(str(data.get("integrationId")))
        if integration is None:
            return
        expires = integration.get("tokenExpiresAt")
        now = self.clock()
        step = after_failure(error, expires if isinstance(expires, datetime) else None, now,
                             self.settings.sync_interval)
        if step.action == "retry":
            assert isinstance(expires, datetime)
            await self.engine.add(QUEUE, data, job_id=job_id(str(integration["_id"])),
                                  delay=step.delay, deadline=as_utc(expires))
        elif step.action == "expire" and await self.store.set_status(
                integration, "expired", now, only_from=("active", "error")):
            reason = f"token expired before a refresh succeeded ({error.get('message')})"
            await self.store.notifications.record("integration.expired", integration, reason,
                                                  now)
            log.warning("token could not be refreshed before expiry; integration marked "
                        "expired", extra={"integrationId": str(integration["_id"])})
