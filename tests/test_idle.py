"""An idle daemon is idle: measured as the process's CPU time, not as loop lag.

The scenario that used to spin: a queue with no free slot (a long job holds its only
slot) and a paused queue, while work keeps falling due and waking workers.
"""

from __future__ import annotations

import hashlib
import json
import time
import urllib.request
from collections.abc import Iterator

import psutil
import pytest

from tests.support.processes import DaemonProcess

pytestmark = pytest.mark.slow

TOKEN = "mwj_idle-test-token"
MEASURE = 5.0  # seconds of CPU sampling per phase
# A few percent of one core: the loop-lag monitor, pings and timers, nothing else.
MAX_SHARE = 0.05


@pytest.fixture
def daemon() -> Iterator[DaemonProcess]:
    tokens = json.dumps([{"name": "idle", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}])
    p = DaemonProcess("demo", "--job-seconds", "120", env={
        "MWAPJOBS_LOG_LEVEL": "info",
        "MWAPJOBS_QUEUES__DEMO__CONCURRENCY": "1",  # the first 120 s job fills the queue
        "MWAPJOBS_ADMIN__TOKENS": tokens,
        "MWAPJOBS_HEALTH__ENABLED": "false",
    })
    try:
        yield p
    finally:
        p.stop()


def demo_stats(p: DaemonProcess) -> dict[str, int]:
    request = urllib.request.Request(f"http://127.0.0.1:{p.port}/api/v1/queues/stats",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        stats: dict[str, int] = json.loads(response.read())["data"]["demo"]
        return stats


def post(p: DaemonProcess, path: str, body: dict[str, object] | None = None) -> int:
    data = json.dumps(body or {}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{p.port}/api/v1{path}", data=data, method="POST",
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return int(response.status)


def cpu_share(p: DaemonProcess, keep_busy: list[str]) -> float:
    """The process's CPU time over MEASURE s, as a share of one core, while runs keep
    falling due (a delayed run every 0.2 s into each queue of `keep_busy`)."""
    proc = psutil.Process(p.pid)
    before = proc.cpu_times()
    t0 = time.monotonic()
    n = 0
    while time.monotonic() - t0 < MEASURE:
        for queue in keep_busy:
            assert post(p, f"/queues/{queue}/jobs", {"data": {"seconds": 0}, "delay": 0.2}) \
                in (200, 201)
            n += 1
        time.sleep(0.2)
    after = proc.cpu_times()
    elapsed = time.monotonic() - t0
    used = (after.user - before.user) + (after.system - before.system)
    share = used / elapsed
    print(f"cpu: {used:.3f} s in {elapsed:.1f} s = {share:.1%} of a core ({n} runs added)")
    return share


def test_a_full_queue_and_a_paused_queue_leave_the_process_idle(daemon: DaemonProcess) -> None:
    p = daemon
    p.wait_http("/readyz", 200)
    deadline = time.monotonic() + 20
    while demo_stats(p)["active"] != 1 or demo_stats(p)["waiting"] < 2:
        assert time.monotonic() < deadline, demo_stats(p)
        time.sleep(0.05)
    # The demo queue's only slot is taken for 120 s; its other runs wait, woken in vain.
    assert cpu_share(p, ["demo"]) < MAX_SHARE
    assert post(p, "/queues/demo/pause") == 200
    assert cpu_share(p, ["demo"]) < MAX_SHARE
