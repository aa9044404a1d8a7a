"""`within`: `asyncio.wait_for` without its Python 3.11 flaw.

In 3.11 a cancellation that reaches `wait_for` just as the awaited thing finishes is
swallowed: `wait_for` returns the result and the task goes on as if never cancelled
(CPython gh-86296, fixed in 3.12 by building `wait_for` on `asyncio.timeout`). A
background loop hit that way ignores its `cancel()` and a graceful stop waits for it
forever. `asyncio.timeout` counts cancellations properly, so this is `wait_for` on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(awaitable: Awaitable[T], seconds: float | None) -> T:
    """Await `awaitable` for at most `seconds` (None: no limit); TimeoutError after."""
    async with asyncio.timeout(seconds):
        return await awaitable
