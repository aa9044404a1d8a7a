"""End to end: the real `mwapjobs` process, its signals, logs and systemd notifications."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.processes import DaemonProcess

pytestmark = pytest.mark.slow


@pytest.fixture
def processes() -> Iterator[list[DaemonProcess]]:
    started: list[DaemonProcess] = []
    yield started
    for p in started:
        p.stop()


def test_sigterm_lets_the_running_job_finish_and_exits_0(processes: list[DaemonProcess]) -> None:
    shutdown_timeout = 15.0
    p = DaemonProcess("demo", "--job-seconds", "2",
                      env={"MWAPJOBS_SHUTDOWN_TIMEOUT": str(shutdown_timeout)})
    processes.append(p)
    p.wait_http("/readyz", 200)
    started = p.wait_line(lambda e: e["message"] == "run started" and e.get("jobId") == "sample-0")
    sent = time.monotonic()
    p.proc.send_signal(signal.SIGTERM)
    assert p.proc.wait(shutdown_timeout + 10) == 0
    took = time.monotonic() - sent
    assert took < shutdown_timeout
    p.wait_line(lambda e: e["message"] == "run completed" and e["runId"] == started["runId"], 5)
    messages = [e["message"] for e in p.lines]
    assert messages.index("signal received") < messages.index("stopped")
    completed_at = next(i for i, e in enumerate(p.lines)
                        if e["message"] == "run completed" and e["runId"] == started["runId"])
    assert completed_at < messages.index("stopped")
    assert "Traceback" not in "".join(p.raw)


def test_second_signal_exits_at_once(processes: list[DaemonProcess]) -> None:
    p = DaemonProcess("demo", "--job-seconds", "60", env={"MWAPJOBS_SHUTDOWN_TIMEOUT": "120"})
    processes.append(p)
    p.wait_http("/readyz", 200)
    p.wait_line(lambda e: e["message"] == "run started")
    p.proc.send_signal(signal.SIGTERM)
    p.wait_line(lambda e: e["message"] == "shutting down")
    sent = time.monotonic()
    p.proc.send_signal(signal.SIGINT)
    code = p.proc.wait(10)
    assert time.monotonic() - sent < 5
    assert code == 1
    p.wait_line(lambda e: e["message"].startswith("second signal"), 2)


def test_unreachable_mongodb_keeps_the_process_alive_and_not_ready(
    processes: list[DaemonProcess],
) -> None:
    # A server that accepts connections and never answers: the worst case for a driver.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        port = silent.getsockname()[1]
        p = DaemonProcess("serve", env={
            "MONGODB_URI": f"mongodb://127.0.0.1:{port}/mwap?directConnection=true",
            "MWAPJOBS_MONGODB__SERVER_SELECTION_TIMEOUT": "0.5",
            "MWAPJOBS_MONGODB__PING_INTERVAL": "0.5",
        })
        processes.append(p)
        body = p.wait_http("/readyz", 503)
        assert body["error"]["code"] == "service/not-ready"
        assert "mongodb unreachable" in body["error"]["message"]
        # The loop stays responsive while every MongoDB attempt hangs until its timeout.
        for _ in range(10):
            t0 = time.monotonic()
            assert p.get("/healthz")[0] == 200
            assert time.monotonic() - t0 < 0.5
            time.sleep(0.1)
        p.wait_line(lambda e: e["message"] == "engine start failed; retrying")
        assert p.proc.poll() is None
        p.proc.send_signal(signal.SIGTERM)
        assert p.proc.wait(15) == 0
    finally:
        silent.close()


def test_logs_are_json_lines_without_secrets(processes: list[DaemonProcess]) -> None:
    key = "a-very-private-encryption-key-123"
    p = DaemonProcess("serve", env={
        "MONGODB_URI": "mongodb://admin:pa55word-xyz@127.0.0.1:1/mwap",
        "ENCRYPTION_KEY": key,
        "MWAPJOBS_MONGODB__SERVER_SELECTION_TIMEOUT": "0.2",
    })
    processes.append(p)
    p.wait_line(lambda e: e["message"] == "engine start failed; retrying")
    p.proc.send_signal(signal.SIGTERM)
    p.proc.wait(15)
    output = p.output()
    assert not p.bad_lines
    assert "pa55word-xyz" not in output
    assert key not in output
    assert all(isinstance(e, dict) and {"timestamp", "level", "message"} <= e.keys()
               for e in p.lines)


def test_systemd_notifications(processes: list[DaemonProcess], tmp_path: Path) -> None:
    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(10)
    try:
        p = DaemonProcess("demo", env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"})
        processes.append(p)
        received: list[str] = []

        def until(message: str) -> None:
            while message not in received:
                received.extend(sock.recv(4096).decode().split("\n"))

        until("READY=1")
        until("WATCHDOG=1")
        watchdogs_before = received.count("WATCHDOG=1")
        time.sleep(0.5)  # the pings come every 0.1 s: several must have arrived meanwhile
        sock.settimeout(0.01)
        try:
            while True:
                received.extend(sock.recv(4096).decode().split("\n"))
        except TimeoutError:
            pass
        assert received.count("WATCHDOG=1") >= watchdogs_before + 2
        sock.settimeout(10)
        p.proc.send_signal(signal.SIGTERM)
        until("STOPPING=1")
        assert p.proc.wait(15) == 0
    finally:
        sock.close()
