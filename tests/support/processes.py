"""Real daemon processes for end-to-end tests: `python -m mwapjobs ...` (or another module,
such as `tests.support.effect_daemon`), with their JSON log lines and stderr collected as
they arrive, and small HTTP helpers for /healthz, /readyz and /metrics."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
TEST_ENCRYPTION_KEY = "0123456789abcdef0123456789abcdef"



class DaemonProcess:
    """`python -m MODULE ARGS` with its JSON log lines collected as they arrive.

    The child gets a clean environment: none of the caller's `MWAPJOBS_*`,
    `MONGODB_URI` or `NOTIFY_SOCKET`, a free HTTP port, debug logs unless `env`
    says otherwise, and `PYTHONPATH` set to this checkout, so the child runs
    the same source tree as the tests (not whatever an editable install
    points at). Every stdout line must be one JSON object; a line that is not
    lands in `bad_lines` (and the reader keeps reading, so a chatty child can
    never block on a full pipe). stderr is collected in `err`.
    """

    def __init__(self, *args: str, env: dict[str, str] | None = None,
                 module: str = "mwapjobs", cwd: Path | None = None) -> None:
        self.port = free_port()
        base = {k: v for k, v in os.environ.items()
                if not k.startswith("MWAPJOBS_") and k not in {"MONGODB_URI", "NOTIFY_SOCKET"}}
        python_path = os.pathsep.join(p for p in (str(ROOT), base.get("PYTHONPATH")) if p)
        self.env = {**base, "PYTHONPATH": python_path,
                    "MWAPJOBS_HTTP__PORT": str(self.port), "MWAPJOBS_LOG_LEVEL": "debug",
                    "ENCRYPTION_KEY": TEST_ENCRYPTION_KEY, **(env or {})}
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args], env=self.env,
            cwd=cwd or ROOT / "tests", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )
        self.pid = self.proc.pid
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self.bad_lines: list[str] = []
        self.err: list[str] = []
        self._new: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._readers = [threading.Thread(target=self._read, daemon=True),
                         threading.Thread(target=self._read_err, daemon=True)]
        for reader in self._readers:
            reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.raw.append(line)
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            if isinstance(entry, dict):
                self.lines.append(entry)
            else:
                self.bad_lines.append(line)
            self._new.put(None)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err.append(line)

    def output(self) -> str:
        """Everything the process wrote so far, stdout then stderr."""
        return "".join(self.raw) + "".join(self.err)

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
        raise AssertionError(f"no matching log line; got: {self.raw[-15:]} {self.err[-15:]}")

    def _drain(self, timeout: float = 0.0) -> bool:
        try:
            self._new.get(timeout=timeout) if timeout else self._new.get_nowait()
            return True
        except queue.Empty:
            return False

    def get(self, path: str, timeout: float = 5) -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}",
                                        timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def get_text(self, path: str, timeout: float = 5) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}",
                                        timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def wait_http(self, path: str, status: int, timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"process exited: {self.raw[-10:]} {self.err[-10:]}"
            try:
                code, body = self.get(path)
                if code == status:
                    return body
                last = (code, body)
            except OSError as exc:
                last = exc
            time.sleep(0.05)
        raise AssertionError(f"{path} never returned {status}; last: {last}")

    def metric(self, name: str, labels: str = "", timeout: float = 5) -> float | None:
        """One sample of /metrics, e.g. metric("mwapjobs_event_loop_lag_seconds", 'stat="max"')."""
        code, text = self.get_text("/metrics", timeout)
        if code != 200:
            return None
        wanted = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(wanted + " "):
                return float(line.split()[-1])
        return None

    def kill(self) -> None:
        """SIGKILL, and wait until it is gone."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.join_output()

    def join_output(self, timeout: float = 5) -> None:
        """After exit: wait until everything it wrote has been read."""
        for reader in self._readers:
            reader.join(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
