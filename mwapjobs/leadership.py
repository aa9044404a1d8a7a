"""One instance leads: it runs the clock of repeats and the leader-only loops (discovery,
alert evaluation, ...); every instance runs workers and serves HTTP.

The leader holds the `leader` lease (storage/leases.py) for `ttl` seconds and renews it
every `ttl / 3`. It stops acting as the leader on its own monotonic clock, `ttl` after
the last renewal it *sent* (not received), so a leader paused past its lease (SIGSTOP,
a frozen VM) stops before doing anything when it wakes up, before the database tells it
the lease is gone; and a new leader can only take the lease once `lockUntil` passed on
the database's side. Followers look for a free lease more often than the leader renews
(`poll_every`, at most a second), so a lease freed by a graceful stop is taken within
about a second, and one left by a killed leader within `ttl` plus `poll_every`.

A graceful stop (`resign`) is for good: the renewal loop may still tick while the
process drains its running jobs, and a step after (or during) `resign` neither takes the
lease again nor renews it, so a stopping instance never leads again and the lease it
freed stays free for the next one.

Leader-only work is registered with `every`/`keep` (the names and arguments of
`Supervisor`): it starts when this instance gains the lease and is cancelled when it
loses it. `on_gain`/`on_lose` callbacks start and stop what is not a loop (the clock).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from .storage.leases import LeaseStore
from .supervisor import FailureLog, Supervisor

log = logging.getLogger(__name__)

LEASE = "leader"
POLL_SECONDS = 1.0  # a follower's longest wait between two looks at the lease


class Leadership:
    def __init__(self, store: LeaseStore, owner: str, ttl: float,
                 clock: Callable[[], datetime]) -> None:
        self.store = store
        self.owner = owner
        self.ttl = ttl
        self.renew_every = ttl / 3
        self.poll_every = min(POLL_SECONDS, self.renew_every / 2)  # how often `tick` runs
        self._renewed_at = 0.0  # monotonic: when the last take or renewal that held was sent
        self.clock = clock
        self.fence: int | None = None  # ours while we hold the lease
        self._valid_until = 0.0  # monotonic: we act as leader until then, at most
        self.tasks = Supervisor("mwapjobs:leader")
        self._loops: list[tuple[str, str, tuple[Any, ...], dict[str, Any]]] = []
        self._on_gain: list[Callable[[], Awaitable[None]]] = []
        self._on_lose: list[Callable[[], Awaitable[None]]] = []
        self._failures = FailureLog(log, "leader lease: MongoDB did not answer", lease=LEASE)
        self.changes = 0  # times this instance gained or lost the lease
        self._closed = False  # resigned or abandoned: never lead again

    @property
    def term(self) -> int | None:
        """Our fence while we lead (each new leadership has a new one), else None."""
        return self.fence if self.leading else None

    @property
    def leading(self) -> bool:
        """We hold the lease and it has not run out by our own clock."""
        return self.fence is not None and time.monotonic() < self._valid_until

    def every(self, name: str, interval: float, step: Callable[[], Awaitable[Any]],
              **options: Any) -> None:
        """A loop that runs only while this instance leads (see `Supervisor.every`)."""
        self._loops.append(("every", name, (interval, step), options))
        if self.leading:
            self.tasks.every(name, interval, step, **options)

    def keep(self, name: str, factory: Callable[[], Awaitable[None]], **options: Any) -> None:
        """A task kept running only while this instance leads (see `Supervisor.keep`)."""
        self._loops.append(("keep", name, (factory,), options))
        if self.leading:
            self.tasks.keep(name, factory, **options)

    def on_change(self, gain: Callable[[], Awaitable[None]],
                  lose: Callable[[], Awaitable[None]]) -> None:
        self._on_gain.append(gain)
        self._on_lose.append(lose)

    async def tick(self) -> None:
        """The engine's loop, every `poll_every` s: a follower tries to take the lease each
        time (one round trip), the leader renews only every `renew_every`."""
        if self.leading and time.monotonic() - self._renewed_at < self.renew_every:
            return
        await self.step()

    async def step(self) -> None:
        """Take, renew or give up the lease now. Never raises."""
        if self._closed:
            return
        sent = time.monotonic()
        try:
            if self.fence is None:
                fence = await self.store.acquire(LEASE, self.owner, self.clock(), self.ttl)
                if fence is not None and self._closed:  # resigned while we asked
                    await self.store.release(LEASE, self.owner, fence)
                elif fence is not None:
                    self.fence, self._valid_until = fence, sent + self.ttl
                    self._renewed_at = sent
                    await self._gained()
            elif not self.leading:  # ran out by our clock (we were paused, or cut off)
                await self._lost("the lease ran out before it could be renewed")
            elif await self.store.renew(LEASE, self.owner, self.fence, self.clock(),
                                        self.ttl):
                self._valid_until, self._renewed_at = sent + self.ttl, sent
            else:
                await self._lost("another instance holds the lease")
        except Exception as exc:
            self._failures.failed(exc)
            if self.fence is not None and not self.leading:
                await self._lost("the lease ran out while MongoDB did not answer")
            return
        self._failures.succeeded()

    async def resign(self) -> None:
        """Stop leading for good and free the lease at once (a graceful stop).

        The leader loops are cancelled first (none does leader work after this), then
        the lease is freed, and only then are their clean-ups waited for and the clock
        stopped (`on_lose`): a change stream's close waits for its getMore in flight,
        the clock's thread may be in a pass that waits on MongoDB, each for seconds, and
        the next instance need not wait for either. That is safe: we no longer act as
        the leader (`leading` is False, so a fire still on its way is refused), a fire
        already written is idempotent (a repeat's run has a unique slot), and a stream's
        token saved late only makes the next leader replay changes it handles again."""
        self._closed = True
        fence = self.fence
        if fence is None:
            return
        self._step_down("stopping")
        self.tasks.cancel_all()
        try:
            await self.store.release(LEASE, self.owner, fence)
        except Exception as exc:  # it runs out by itself within `ttl`
            log.warning("could not release the leader lease", extra={
                "error": f"{type(exc).__name__}: {exc}"[:300]})
        await self.tasks.stop()
        for lose in self._on_lose:
            await lose()

    async def abandon(self) -> None:
        """Stop leading without a word to the database, as a killed process would (tests
        of failover): the lease stays taken until it runs out."""
        self.fence = None
        await self._end_leader_work()

    async def _gained(self) -> None:
        self.changes += 1
        log.info("this instance leads now", extra={"owner": self.owner, "fence": self.fence})
        for kind, name, args, options in self._loops:
            getattr(self.tasks, kind)(name, *args, **options)
        for gain in self._on_gain:
            await gain()

    async def _lost(self, why: str) -> None:
        self._step_down(why)
        await self._end_leader_work()

    def _step_down(self, why: str) -> None:
        """Stop acting as the leader now (no await: nothing leads in between)."""
        self.changes += 1
        log.log(logging.INFO if why == "stopping" else logging.WARNING,
                "this instance no longer leads",
                extra={"owner": self.owner, "fence": self.fence, "why": why})
        self.fence = None

    async def _end_leader_work(self) -> None:
        await self.tasks.stop()
        for lose in self._on_lose:
            await lose()
