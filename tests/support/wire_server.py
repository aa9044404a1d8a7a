"""A private MongoDB-wire server (SecantusDB's `secantusd-py`) that a test may freeze,
kill and restart: database outages on real processes.

SecantusDB is a GPL-2.0 beta test tool. It lives in its own virtualenv
(`.venv-secantus`, made by `.ci/setup`) and runs only as a separate process;
nothing imports it. `MWAPJOBS_TEST_SECANTUSD` names its `secantusd-py`; without it,
`.venv-secantus/bin/secantusd-py` of this checkout is used if it exists.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import IO, Any

import pymongo
from pymongo.errors import PyMongoError

from tests.support.ports import free_port
from tests.support.processes import ROOT

SERVER_START_TIMEOUT = 60.0
SERVER_STOP_TIMEOUT = 20.0
# Writes get slower as the oplog grows (0.6 ms fresh, 60 ms at the default cap of 100,000
# entries); nothing in the tests reads it. The same cap as .ci/wire-server.
OPLOG_MAX_ENTRIES = 5000


def secantusd_path() -> Path | None:
    """The `secantusd-py` to run, or None when there is none on this machine."""
    named = os.environ.get("MWAPJOBS_TEST_SECANTUSD")
    if named:
        return Path(named)
    local = ROOT / ".venv-secantus" / "bin" / "secantusd-py"
    return local if local.exists() else None


def with_database(base_uri: str, database: str, **options: str) -> str:
    """`base_uri` (mongodb://host:port[/db][?opts]) with `database` as its path and
    `options` added to (or replacing) its query options."""
    scheme, _, rest = base_uri.partition("://")
    rest, _, query = rest.partition("?")
    hosts = rest.split("/", 1)[0]
    merged: dict[str, str] = {}
    for item in filter(None, query.split("&")):
        key, _, value = item.partition("=")
        merged[key] = value
    merged.update(options)
    tail = "&".join(f"{k}={v}" for k, v in merged.items())
    return f"{scheme}://{hosts}/{database}" + (f"?{tail}" if tail else "")


class SecantusServer:
    """One `secantusd-py` on a free loopback port, with its data in `home`/data.

    `freeze()` (SIGSTOP) and `thaw()` (SIGCONT) make a server that accepts
    connections and never answers, the worst case for a driver; `kill()`
    (SIGKILL) and `restart()` (same port and storage) make one that is gone and
    comes back. Writes survive a SIGKILL only if they were journaled: use
    `uri(db, journal="true")` for tests that kill the server.
    """

    def __init__(self, executable: Path, home: Path, port: int | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.executable = executable
        self.extra_args = extra_args
        self.home = home
        self.storage = home / "data"
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.frozen = False

    @property
    def log_path(self) -> Path:
        return self.home / "secantusd.log"

    def uri(self, database: str = "", **options: str) -> str:
        return with_database(f"mongodb://127.0.0.1:{self.port}", database,
                             directConnection="true", **options)

    def start(self) -> SecantusServer:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.storage.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [str(self.executable), "--host", "127.0.0.1", "--port", str(self.port),
             "--storage-path", str(self.storage), "--log-level", "WARNING",
             "--oplog-max-entries", str(OPLOG_MAX_ENTRIES), *self.extra_args],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        self.frozen = False
        self.wait_ping()
        return self

    def wait_ping(self, timeout: float = SERVER_START_TIMEOUT) -> float:
        """Wait until the server answers `ping`; returns how long that took."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"secantusd-py exited with {self.proc.returncode}: "
                                     f"{self.log_tail()}")
            try:
                with pymongo.MongoClient(self.uri(), serverSelectionTimeoutMS=500,
                                         connectTimeoutMS=500) as client:
                    client.admin.command("ping")
                return time.monotonic() - t0
            except PyMongoError as exc:
                last = exc
                time.sleep(0.1)
        raise AssertionError(f"secantusd-py on port {self.port} never answered ping within "
                             f"{timeout:g}s: {last}; {self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None and self.proc.poll() is None, "not running"
        self.proc.send_signal(sig)

    def fail_commands(self, commands: list[str], app_name: str = "mwapjobs",
                      mode: Any = "alwaysOn", **data: Any) -> None:
        """Make `commands` of the clients named `app_name` fail (default: the connection is
        closed, as in a network error) until `heal()`. Needs `--enable-test-commands`."""
        failure = data or {"closeConnection": True}
        with pymongo.MongoClient(self.uri(), serverSelectionTimeoutMS=10_000) as client:
            client.admin.command({"configureFailPoint": "failCommand", "mode": mode,
                                  "data": {"failCommands": commands, "appName": app_name,
                                           **failure}})

    def heal(self) -> None:
        with pymongo.MongoClient(self.uri(), serverSelectionTimeoutMS=10_000) as client:
            client.admin.command({"configureFailPoint": "failCommand", "mode": "off"})

    def freeze(self) -> None:
        self._signal(signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        self._signal(signal.SIGCONT)
        self.frozen = False

    def kill(self) -> None:
        """SIGKILL: gone at once; writes that were not journaled are lost."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.frozen = False
        self._close_log()

    def restart(self) -> float:
        """Start again on the same port and storage; returns how long until ping answered."""
        t0 = time.monotonic()
        self.start()
        return time.monotonic() - t0

    def stop(self) -> None:
        """SIGTERM (after SIGCONT if frozen) and wait; SIGKILL if it does not stop in time."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            if self.frozen:
                proc.send_signal(signal.SIGCONT)
            proc.terminate()
            try:
                proc.wait(SERVER_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self.frozen = False
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
