"""A test that hangs ends the run with a dump instead of holding CI until its limit.

After `MWAPJOBS_TEST_HANG_SECONDS` (default 600, five times the slowest test) in one
test (setup and teardown included), every thread's stack and every pending asyncio
task's stack go to stderr and the process exits 3: a hang is a failure that says where
it waited.
"""

from __future__ import annotations

import asyncio
import faulthandler
import os
import sys
import threading
from collections.abc import Iterator

import pytest

LIMIT = float(os.environ.get("MWAPJOBS_TEST_HANG_SECONDS", "600"))


def _dump_and_exit(item: pytest.Item) -> None:
    name = item.nodeid
    capture = item.config.pluginmanager.getplugin("capturemanager")
    if capture is not None:  # the dump goes to the real stderr, not into the capture
        capture.suspend_global_capture(in_=True)
    err = sys.stderr
    print(f"\n===== {name} still running after {LIMIT:g} s: stacks =====", file=err)
    faulthandler.dump_traceback(file=err, all_threads=True)
    for task in list(asyncio.tasks._all_tasks):  # every loop's tasks (read-only here)
        if not task.done():
            print(f"--- {task!r}", file=err)
            task.print_stack(file=err)
    err.flush()
    os._exit(3)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None
                            ) -> Iterator[None]:
    """Setup, call and teardown (a fixture's stop can hang too)."""
    timer = threading.Timer(LIMIT, _dump_and_exit, args=(item,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
