"""End to end: the real `mwapjobs` process, its signals, logs and systemd notifications."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DaemonProcess:
    """`python -m mwapjobs ...` with its JSON log lines collected as they arrive."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        base = {k: v for k, v in os.environ.items()
                if not k.startswith("MWAPJOBS_") and k not in {"MONGODB_URI", "NOTIFY_SOCKET"}}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mwapjobs", *args],
            env={**base, "MWAPJOBS_HTTP__PORT": str(self.port), "MWAPJOBS_LOG_LEVEL": "debug",
                 "ENCRYPTION_KEY": "0123456789abcdef0123456789abcdef",
                 **(env or {})},
            cwd=ROOT / "tests", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._new: queue.SimpleQueue[None] = queue.SimpleQueue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.raw.append(line)
            self.lines.append(json.loads(line))  # every line must be one JSON object
            self._new.put(None)

    def wait_line(
        self, match: Callable[[dict[str, Any]], bool], timeout: float = 20
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for entry in list(self.lines):
                if match(entry):
                    return entry
            if self.proc.poll() is not None and not self._drain():
                break
            self._drain(timeout=0.05)
        raise AssertionError(f"no matching log line; got: {self.raw[-15:]}")

    def _drain(self, timeout: float = 0.0) -> bool:
        try:
            self._new.get(timeout=timeout) if timeout else self._new.get_nowait()
            return True
        except queue.Empty:
            return False

    def get(self, path: str) -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def wait_http(self, path: str, status: int, timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"process exited: {self.raw[-10:]}"
            try:
                code, body = self.get(path)
                if code == status:
                    return body
                last = (code, body)
            except OSError as exc:
                last = exc
            time.sleep(0.05)
        raise AssertionError(f"{path} never returned {status}; last: {last}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


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
    output = "".join(p.raw)
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
