"""The alert manager: evaluates rules, fires and resolves alerts, delivers notifications.

Two background tasks, never on a job's path:

- every `alerts.check_interval` seconds the rules are checked; a condition
  that becomes true sends "[mwapjobs] FIRING: <rule>: <details>" once, then
  stays quiet for `alerts.cooldown` seconds (after which it is sent again if
  still true), and "[mwapjobs] RESOLVED: <rule>" when it clears. An alert
  that clears and comes back within the cool-down is announced again when the
  cool-down ends, so a flapping condition cannot flood the channels.
- tenant-owner notifications (`mwapjobs_notifications`, `delivered: false`)
  are delivered to the same channels and marked delivered; a failing channel
  leaves them undelivered, retried with backoff, durably.

Alert messages go through a `Dispatcher`: one worker per channel, each with
its own in-memory queue, timeout and backoff, so a dead webhook neither delays
email nor blocks anything else. Alert state lives in memory; after a restart
the conditions are simply evaluated again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from ..config import Settings
from ..logs import secrets
from ..queues import QueueRegistry
from ..storage.alert_history import AlertHistoryStore
from ..storage.alert_state import AlertStateStore
from ..storage.mongo import Mongo
from ..storage.notifications import NotificationStore
from ..storage.runs import RunStore
from ..supervisor import Supervisor
from ..timeouts import within
from .channels import (
    Channel,
    ChannelError,
    Message,
    channels_from_settings,
    firing,
    notification,
    resolved,
)
from .rules import Condition, Rule, RuleContext, default_rules

log = logging.getLogger("mwapjobs.alerts")


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class _Pending:
    message: Message
    attempts: int = 0


class Dispatcher:
    """Deliver each message to every channel, retrying failures with backoff.

    `submit` never blocks and never raises, so anything may call it. Messages
    for one channel go out in order; a failing channel retries its oldest
    message with exponential backoff (`retry_base` doubling up to `retry_max`)
    until it succeeds. At most `max_pending` messages wait per channel; beyond
    that the oldest waiting one is dropped, with an error line.
    """

    def __init__(self, channels: Sequence[Channel], *, timeout: float = 30.0,
                 retry_base: float = 1.0, retry_max: float = 300.0,
                 max_pending: int = 1000) -> None:
        self.channels = list(channels)
        self.timeout = timeout
        self.retry_base = retry_base
        self.retry_max = retry_max
        self.max_pending = max_pending
        self._queues: dict[str, deque[_Pending]] = {c.name: deque() for c in self.channels}
        self._wake: dict[str, asyncio.Event] = {}
        self._hurry: asyncio.Event | None = None
        self._idle = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # channel -> (monotonic time its deliveries started failing, the last error)
        self.failing: dict[str, tuple[float, str]] = {}

    def start(self) -> None:
        self._hurry = asyncio.Event()
        for channel in self.channels:
            self._wake[channel.name] = asyncio.Event()
            task = asyncio.ensure_future(self._worker(channel))
            task.set_name(f"mwapjobs:alerts:{channel.name}")
            self._tasks.append(task)

    def submit(self, message: Message) -> None:
        for channel in self.channels:
            queue = self._queues[channel.name]
            if len(queue) >= self.max_pending and len(queue) > 1:
                dropped = queue[1]  # [0] may be in flight
                del queue[1]
                log.error("alert dropped: too many undelivered alerts for this channel",
                          extra={"channel": channel.name, "dropped": dropped.message.text,
                                 "pending": len(queue)})
            queue.append(_Pending(message))
            self._idle.clear()
            event = self._wake.get(channel.name)
            if event is not None:
                event.set()

    def pending(self, channel: str | None = None) -> int:
        if channel is not None:
            return len(self._queues.get(channel, ()))
        return sum(len(q) for q in self._queues.values())

    async def stop(self, flush_timeout: float = 5.0) -> None:
        """Try to deliver what is queued (one more attempt now for anything backing
        off), for up to `flush_timeout` seconds; what is left is logged as lost."""
        if self._hurry is not None:
            self._hurry.set()
        if self._tasks and self.pending():
            with contextlib.suppress(TimeoutError):
                await within(self._idle.wait(), flush_timeout)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for name, queue in self._queues.items():
            for item in queue:
                log.error("alert not delivered before shutdown",
                          extra={"channel": name, "text": item.message.text,
                                 "attempts": item.attempts})
            queue.clear()

    async def _worker(self, channel: Channel) -> None:
        queue = self._queues[channel.name]
        wake = self._wake[channel.name]
        while True:
            if not queue:
                wake.clear()
                await wake.wait()
                continue
            item = queue[0]
            try:
                await within(channel.send(item.message), self.timeout)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                item.attempts += 1
                delay = min(self.retry_base * 2 ** (item.attempts - 1), self.retry_max)
                error = _describe(exc, self.timeout)
                since = self.failing.get(channel.name, (time.monotonic(), ""))[0]
                self.failing[channel.name] = (since, error)
                log.error("alert delivery failed; will retry",
                          extra={"channel": channel.name, "error": error,
                                 "attempts": item.attempts, "retryIn": delay,
                                 "text": item.message.text})
                await self._backoff(delay)
                continue
            self.failing.pop(channel.name, None)
            if queue and queue[0] is item:
                queue.popleft()
            if not self.pending():
                self._idle.set()
            if item.attempts:
                log.info("alert delivered after retrying",
                         extra={"channel": channel.name, "attempts": item.attempts + 1,
                                "text": item.message.text})

    async def _backoff(self, delay: float) -> None:
        """Wait `delay`, or until `stop` asks for one last attempt (only once: a
        channel that fails again then waits out its delay, not a hot loop)."""
        assert self._hurry is not None
        if self._hurry.is_set():
            await asyncio.sleep(delay)
            return
        with contextlib.suppress(TimeoutError):
            await within(self._hurry.wait(), delay)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _changed(saved: dict[str, Any] | None, doc: dict[str, Any]) -> bool:
    """Worth a write: anything but the details text and sub-second time drift."""
    if saved is None:
        return True
    for field in ("rule", "label", "active", "announced"):
        if saved.get(field) != doc.get(field):
            return True
    for field in ("since", "lastSentAt"):
        a, b = saved.get(field), doc.get(field)
        if (a is None) != (b is None):
            return True
        if isinstance(a, datetime) and isinstance(b, datetime) and \
                abs((_aware(a) - _aware(b)).total_seconds()) > 1.0:
            return True
    return False


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"timed out after {timeout}s"
    if isinstance(exc, ChannelError):
        return str(exc)[:500]
    return f"{type(exc).__name__}: {exc}"[:500]


@dataclass
class AlertState:
    """What operators have been told about one condition."""

    rule: str
    label: str
    details: str
    since: datetime
    active: bool = False  # the condition was true at the last check
    announced: bool = False  # a FIRING went out and no RESOLVED since
    last_sent: float | None = None  # monotonic time of the last FIRING


class AlertManager:
    """Rules, their alert state, the channels, and tenant-notification delivery."""

    def __init__(
        self,
        settings: Settings,
        mongo: Mongo,
        registry: QueueRegistry,
        *,
        clock: Callable[[], datetime] = _utcnow,
        monotonic: Callable[[], float] = time.monotonic,
        mongo_down_since: Callable[[], float | None] = lambda: None,
        mongo_error: Callable[[], str | None] = lambda: None,
        is_paused: Callable[[str], bool] = lambda _queue: False,
        term: Callable[[], int | None] = lambda: 0,
        channels: Sequence[Channel] | None = None,
        rules: Sequence[Rule] | None = None,
        channel_timeout: float = 30.0,
    ) -> None:
        """`rules`: the rules to check (default: the generic ones; jobs add theirs with
        `add_rule`). Rules are checked only while `term()` is not None: the fence of this
        instance's leadership (one instance of several evaluates); the alert state is
        shared through `mwapjobs_alerts` and read again at each new term."""
        self.settings = settings
        self.enabled = settings.alerting_enabled
        self.mongo = mongo
        self.runs = RunStore(mongo)
        self.notifications = NotificationStore(mongo)
        self.history = AlertHistoryStore(mongo)  # what was sent, kept for the record
        self.registry = registry
        self.clock = clock
        self.monotonic = monotonic
        self._mongo_down_since = mongo_down_since
        self._mongo_error = mongo_error
        self._is_paused = is_paused
        self._term = term
        self.shared = AlertStateStore(mongo)
        self._loaded: int | None = None  # the term for which the shared state was read
        self._states_term: int | None = None  # the term `states` were last updated in
        self._saved: dict[str, dict[str, Any]] = {}  # what `mwapjobs_alerts` holds
        self.channels: list[Channel] = (
            list(channels) if channels is not None
            else channels_from_settings(settings, channel_timeout) if self.enabled else []
        )
        self.dispatcher = Dispatcher(self.channels, timeout=channel_timeout)
        self.rules = list(rules) if rules is not None else default_rules()
        self.states: dict[str, AlertState] = {}
        self._rule_errors: dict[str, str] = {}
        self.check_interval = settings.alerts.check_interval
        self.cooldown = settings.alerts.cooldown
        # Tenant notifications: one pass every `notify_interval` seconds; a failed
        # one waits `notify_retry_base` doubling up to `notify_retry_max`.
        self.notify_interval = settings.alerts.check_interval
        self.notify_retry_base = settings.alerts.check_interval
        self.notify_retry_max = 3600.0
        self.notify_batch = 100
        self.channel_timeout = channel_timeout
        self.started_at = clock()
        self._tasks = Supervisor("mwapjobs:alerts")
        self._started = False
        self._routed_only = False  # True: a job delivers tenant notifications itself

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Start the rule and notification loops (nothing at all when disabled)."""
        if not self.enabled:
            log.info("alerting is disabled (ALERTING_ENABLED=false): no alerts or "
                     "notifications are sent; notifications stay recorded")
            return
        if self._started:
            return
        self._started = True
        self.started_at = self.clock()
        self.dispatcher.start()
        self._tasks.every("evaluate", self.check_interval, self.evaluate)
        self._tasks.every("notifications", self.notify_interval, self._notification_pass,
                          max_backoff=300.0)
        log.info("alerting started", extra={
            "channels": [c.name for c in self.channels],
            "rules": [r.name for r in self.rules],
            "checkInterval": self.check_interval, "cooldown": self.cooldown})

    def add_rule(self, rule: Rule) -> None:
        """A job's rule (from its registration, before `start`)."""
        if any(r.name == rule.name for r in self.rules):
            raise ValueError(f"alert rule {rule.name!r} is registered twice")
        self.rules.append(rule)

    async def stop(self, flush_timeout: float = 5.0) -> None:
        await self._tasks.stop()
        self._started = False
        await self.dispatcher.stop(flush_timeout if self.enabled else 0.0)
        for channel in self.channels:
            with contextlib.suppress(Exception):
                await channel.close()

    # -- rules ---------------------------------------------------------------

    def firing(self) -> list[AlertState]:
        """Alerts operators were told about and that have not resolved."""
        return [s for s in self.states.values() if s.announced]

    async def evaluate(self) -> list[Message]:
        """Check every rule once, update alert state, and hand messages to the channels.
        Returns the messages sent. Never raises for a rule's failure."""
        if not self.enabled:
            return []
        down_since = self._mongo_down_since()
        term = self._term()
        leading = term is not None
        if not leading:
            self._loaded = None
            if down_since is None:
                return []  # the leader evaluates
            # MongoDB is down, so nobody can lead: each instance reports what needs no
            # database (so an outage is announced by every instance that sees it).
        elif self._loaded != term and down_since is None:
            await self._load_shared(term)
        ctx = RuleContext(
            runs=self.runs, mongo=self.mongo, settings=self.settings,
            queues=self.registry.names(), is_paused=self._is_paused, now=self.clock(),
            monotonic=self.monotonic(), mongo_down_since=down_since,
            mongo_error=self._mongo_error(), started_at=self.started_at,
            channel_failures=dict(self.dispatcher.failing),
        )
        # While MongoDB is known to be down, rules that need it keep their state.
        runnable = [r for r in self.rules if not (r.needs_db and down_since is not None)]
        if not leading:
            runnable = [r for r in runnable if not r.needs_db]
        results = await asyncio.gather(*(self._check(rule, ctx) for rule in runnable))
        messages: list[Message] = []
        for rule, conditions in zip(runnable, results, strict=True):
            if conditions is not None:
                messages.extend(self._update(rule.name, conditions, ctx))
        if leading:
            self._states_term = term
        for message in messages:
            self.dispatcher.submit(message)
        await self._keep(messages, ctx.now)
        if down_since is None and leading:
            await self._save_shared(ctx)
        return messages

    async def _keep(self, messages: list[Message], now: datetime) -> None:
        """Record what was sent in the alert history (a failure costs the record only:
        the messages are on their way already)."""
        if not messages:
            return
        events = [{**m.event, "details": secrets.scrub(str(m.event.get("details") or ""))}
                  for m in messages]
        try:
            await self.history.record(events, now)
        except Exception as exc:
            log.warning("alert history not recorded", extra={
                "error": f"{type(exc).__name__}: {exc}"[:300], "messages": len(messages)})

    async def _load_shared(self, term: int | None) -> None:
        """Take over the alert state the previous leader left (or our own, after a
        restart)."""
        try:
            saved = await self.shared.load()
        except Exception as exc:
            log.warning("could not read the shared alert state; starting afresh",
                        extra={"error": _describe(exc, self.check_interval)})
            return
        now, mono = self.clock(), self.monotonic()
        current = self._states_term == term  # else ours are from an earlier term
        if not current:
            self.states = {}  # the shared account wins
        for key, doc in saved.items():
            if current and key in self.states:
                continue  # what we did in this term is newer than what was saved
            sent = doc.get("lastSentAt")
            since = doc.get("since")
            self.states[key] = AlertState(
                str(doc.get("rule")), str(doc.get("label")), str(doc.get("details")),
                _aware(since) if isinstance(since, datetime) else now,
                active=bool(doc.get("active")), announced=bool(doc.get("announced")),
                last_sent=None if not isinstance(sent, datetime)
                else mono - (now - _aware(sent)).total_seconds())
        self._saved = saved
        self._loaded = term

    async def _save_shared(self, ctx: RuleContext) -> None:
        """Write what changed since the last evaluation (usually nothing)."""
        current: dict[str, dict[str, Any]] = {}
        for key, state in self.states.items():
            sent = (None if state.last_sent is None
                    else ctx.now - timedelta(seconds=ctx.monotonic - state.last_sent))
            current[key] = {"rule": state.rule, "label": state.label,
                            "details": state.details, "since": state.since,
                            "active": state.active, "announced": state.announced,
                            "lastSentAt": sent}
        try:
            for key, doc in current.items():
                if _changed(self._saved.get(key), doc):
                    await self.shared.save(key, doc)
                    self._saved[key] = doc
            for key in [k for k in self._saved if k not in current]:
                await self.shared.drop(key)
                del self._saved[key]
        except Exception as exc:
            log.warning("could not write the shared alert state",
                        extra={"error": _describe(exc, self.check_interval)})

    async def _check(self, rule: Rule, ctx: RuleContext) -> list[Condition] | None:
        timeout = max(self.check_interval, 5.0)
        try:
            conditions = await within(rule.check(ctx), timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = _describe(exc, timeout)
            if self._rule_errors.get(rule.name) != error:
                log.warning("alert rule could not be checked; keeping its state",
                            extra={"rule": rule.name, "error": error})
            self._rule_errors[rule.name] = error
            return None
        if self._rule_errors.pop(rule.name, None) is not None:
            log.info("alert rule checked again", extra={"rule": rule.name})
        return conditions

    def _runbook(self, rule: str) -> str | None:
        """The rule's page (docs/runbooks/<rule>.md under the configured base)."""
        base = self.settings.alerts.runbook_url.rstrip("/")
        return f"{base}/{rule}.md" if base else None

    def _update(self, rule: str, conditions: list[Condition],
                ctx: RuleContext) -> list[Message]:
        now = ctx.monotonic
        out: list[Message] = []
        seen: set[str] = set()
        for cond in conditions:
            seen.add(cond.key)
            state = self.states.get(cond.key)
            if state is None:
                state = AlertState(rule, cond.label, cond.details, ctx.now)
                self.states[cond.key] = state
            if not state.active:  # a new episode (possibly within the last one's cool-down)
                state.active, state.since = True, ctx.now
            state.details = cond.details
            if state.last_sent is not None and now - state.last_sent < self.cooldown:
                continue  # quiet: fired recently
            out.append(firing(cond.label, cond.details, self._runbook(rule),
                              subject=cond.subject, alert=rule, since=state.since.isoformat(),
                              repeat=state.announced))
            state.announced, state.last_sent = True, now
        for key, state in list(self.states.items()):
            if state.rule != rule or key in seen:
                continue
            state.active = False
            if state.announced:
                out.append(resolved(state.label, alert=rule,
                                    since=state.since.isoformat()))
                state.announced = False
            if state.last_sent is None or now - state.last_sent >= self.cooldown:
                del self.states[key]
        return out

    # -- tenant-owner notifications ----------------------------------------------

    def leave_owner_notifications(self, to: str) -> None:
        """Job `to` delivers tenant notifications to their owners itself: from now on the
        operators' channels get only those it routes to them (no address to use)."""
        self._routed_only = True
        log.info("tenant notifications go to their owners first", extra={"by": to})

    async def deliver_notifications(self) -> int:
        """One pass: deliver due undelivered notifications to every channel that has
        not taken them yet. Returns how many were completely delivered."""
        if not self.enabled or not self.channels:
            return 0
        now = self.clock()
        hold = now + timedelta(seconds=2 * self.channel_timeout + 30)
        broken: dict[str, str] = {}  # channel → error, for this pass
        waiting: dict[str, int] = {}
        delivered = 0
        for _ in range(self.notify_batch):
            doc = await self.notifications.claim(now, hold, routed_only=self._routed_only)
            if doc is None:
                break
            message = notification(doc)
            done_before = set(doc.get("deliveredTo") or [])
            todo = [c for c in self.channels if c.name not in done_before]
            attempt = [c for c in todo if c.name not in broken]
            errors = await asyncio.gather(*(self._send_once(c, message) for c in attempt))
            ok = [c.name for c, err in zip(attempt, errors, strict=True) if err is None]
            for channel, err in zip(attempt, errors, strict=True):
                if err is not None:
                    broken[channel.name] = err
            failed = [c.name for c in todo if c.name not in ok]
            for name in failed:
                waiting[name] = waiting.get(name, 0) + 1
            retry_at = None
            if failed:
                attempts = int(doc.get("attempts") or 0)
                delay = min(self.notify_retry_base * 2 ** attempts, self.notify_retry_max)
                retry_at = now + timedelta(seconds=delay)
            error = "; ".join(f"{name}: {broken[name]}" for name in failed) or None
            await self.notifications.record_delivery(doc["_id"], ok, not failed, now, error,
                                                     retry_at)
            delivered += not failed
        for name, error in broken.items():
            log.error("notification delivery failed; will retry",
                      extra={"channel": name, "error": error, "undelivered": waiting[name]})
        return delivered

    async def _send_once(self, channel: Channel, message: Message) -> str | None:
        try:
            await within(channel.send(message), self.channel_timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return _describe(exc, self.channel_timeout)
        return None

    async def _notification_pass(self) -> None:
        """A delivery pass, skipped while MongoDB is known to be down."""
        if self._mongo_down_since() is None:
            await self.deliver_notifications()
