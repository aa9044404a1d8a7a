"""Running the daemon as a service: stop gracefully on SIGTERM/SIGINT, and on a second
signal hand the running jobs back and exit at once."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from .daemon import Daemon
from .logs import stop_logging
from .timeouts import within

log = logging.getLogger("mwapjobs.daemon")
QUIT_RELEASE_SECONDS = 2.0


async def run_until_signalled(daemon: Daemon) -> int:
    """Run `daemon` until SIGTERM/SIGINT, then stop gracefully and return 0.

    A second signal exits at once. Work is not lost even then: active runs
    keep their lease in MongoDB until it expires, and the next start requeues
    them.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    quitting: list[asyncio.Task[None]] = []

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            if not quitting:
                quitting.append(asyncio.ensure_future(_quit(daemon, sig)))
            return
        log.info("signal received", extra={"signal": sig.name})
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    await daemon.start()
    await stop.wait()
    await daemon.stop()
    return 0


async def _quit(daemon: Daemon, sig: signal.Signals) -> None:
    """A second signal: hand the running jobs back to their queues (for at most
    QUIT_RELEASE_SECONDS) and exit 1. They run again at once elsewhere or after the
    restart; nothing counts this as a crash."""
    released: int | str = 0
    try:
        released = await within(daemon.engine.release_all(), QUIT_RELEASE_SECONDS)
    except Exception as exc:
        released = f"not released ({type(exc).__name__}); they run again after their lease"
    log.error("second signal: exiting now", extra={"signal": sig.name, "released": released})
    stop_logging()
    os._exit(1)
