"""Pages fetched one ahead of the writer: while page N is written, page N+1 is already
being asked for (its cursor came with page N), so a pass costs about one provider
latency per page, not one latency plus one write.

At most one page waits between the two (plus the one being written and the one being
fetched), so memory stays bounded whatever the folder's size. A lister that needs
everything so far written before it goes on (Drive walks the folders the writer queued)
awaits `barrier()`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType

from .model import Page

_END = object()


class Feed:
    """`async with Feed(make) as feed:` where `make(barrier)` returns the lister's
    pages; `await feed.next()` gives each page (None at the end), and `feed.written()`
    says the page given last is written."""

    def __init__(self, make: Callable[[Callable[[], Awaitable[None]]], AsyncIterator[Page]]
                 ) -> None:
        self._queue: asyncio.Queue[object] = asyncio.Queue(maxsize=1)
        self._pages = make(self.barrier)
        self._task: asyncio.Task[None] | None = None
        self._taken = False

    async def barrier(self) -> None:
        """Until every page handed out so far is written."""
        await self._queue.join()

    async def __aenter__(self) -> Feed:
        self._task = asyncio.create_task(self._produce(), name="mwapjobs:file-index-feed")
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop fetching now: no page is asked for after this (the one in flight is
        abandoned). Call it before any other await when the pages will not be written."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _produce(self) -> None:
        try:
            async for page in self._pages:
                await self._queue.put(page)
            await self._queue.put(_END)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the consumer raises it
            await self._queue.put(exc)
        finally:
            aclose = getattr(self._pages, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    async def next(self) -> Page | None:
        if self._taken:
            self.written()
        item = await self._queue.get()
        self._taken = item is not _END and not isinstance(item, BaseException)
        if item is _END:
            self._queue.task_done()
            return None
        if isinstance(item, BaseException):
            self._queue.task_done()
            raise item
        assert isinstance(item, Page)
        return item

    def written(self) -> None:
        """The page given last is written (also implied by the next `next()`)."""
        if self._taken:
            self._taken = False
            self._queue.task_done()
