"""The one way the test simulators (token issuers, provider APIs, webhook receivers, a
JWKS) listen: an aiohttp app on 127.0.0.1, on a free port unless told one, started and
stopped with `async with` (or `start()`/`stop()` where a test needs them apart)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Self

from aiohttp import web


class LocalServer:
    """A subclass adds its routes in `routes`; `port` is the bound one once started."""

    host = "127.0.0.1"
    # aiohttp waits this long for requests in flight at stop; simulators that hold
    # requests on purpose (a hung provider) set it short.
    shutdown_timeout = 60.0
    backlog = 128  # a simulator a benchmark floods raises it

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    def stopping(self) -> None:
        """Called first by `stop`: release what requests wait on, so none outlives it."""

    async def start(self) -> Self:
        app = web.Application()
        self.routes(app)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=self.shutdown_timeout)
        await runner.setup()
        await web.TCPSite(runner, self.host, self.port, backlog=self.backlog).start()
        self._runner, self.port = runner, runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        self.stopping()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def serve_until_killed(server: LocalServer) -> int:
    """Run `server` as a process of its own (the benchmarks' simulators): print
    `PORT <n>` once it listens, serve until killed."""
    async def serve() -> None:
        async with server:
            print(f"PORT {server.port}", flush=True)
            await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
    return 0
