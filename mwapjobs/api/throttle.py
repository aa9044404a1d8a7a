"""How often a client may do something costly: a sliding window per key, in memory.

Used for failed dashboard logins (per client address) and manual token refreshes (per
integration, since each one spends the platform's shared OAuth client). Memory is
bounded: the least recently seen keys are forgotten first.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable


class Throttle:
    def __init__(self, limit: int, window: float, *, max_keys: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self._max_keys = max_keys
        self._clock = clock
        self._hits: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, key: str) -> float | None:
        """Seconds until `key` may act again, or None if it may now."""
        hits = self._hits.get(key)
        if hits is None:
            return None
        now = self._clock()
        while hits and now - hits[0] >= self.window:
            hits.popleft()
        if len(hits) < self.limit:
            return None
        return max(0.001, self.window - (now - hits[0]))

    def hit(self, key: str) -> None:
        hits = self._hits.pop(key, None) or deque(maxlen=self.limit)
        hits.append(self._clock())
        self._hits[key] = hits
        while len(self._hits) > self._max_keys:
            self._hits.popitem(last=False)

    def clear(self, key: str) -> None:
        self._hits.pop(key, None)
