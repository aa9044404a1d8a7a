"""What the crash and outage tests share (tests/test_crash_*.py).

Every test starts real daemons (`python -m tests.support.effect_daemon`: the real
`Daemon`, configured like `mwapjobs serve`, with one `effect` queue whose jobs write one
document to `test_effects` per execution) and kills, stops, restarts or starves them of
their database, then checks the run documents and the effects against the README's
guarantee: at least once, nothing silently lost, and a job runs again only if it was
running when its process died.

They run only on the wire lane (`MWAPJOBS_TEST_MONGODB_URI`, see README "Quick start"):
each module sets `pytestmark = WIRE_LANE_ONLY`. The outage tests also need their own
server to freeze and kill (`secantus_server`, tests/conftest.py). Each test uses its own
database, dropped afterwards. Figures are printed: `pytest -s`.

Timing: the tests wait on conditions, polling every 0.1 s or so, with generous overall
timeouts because the server (SecantusDB, in Python) is slower than mongod. The only
sleeps are deliberate moments (a kill at a random moment, an outage of 30 s, a
downtime of 65 s), never a wait that hopes something has happened by then.

- fixtures: `processes` (every `DaemonProcess` started is stopped afterwards), `shared_db`
  (a `CrashDb` on the wire lane's server); a module binds them as its own:
  `processes = crash.processes`;
- the daemons: `effect_env`, `start`, `wait_ready`, `wait_seeded`, `sigterm`,
  `log_problems`, `skip_times`, `seed_lines`;
- the outcome: `CrashDb`, `tally`, `all_done`; repeats: `grid_slot`, `double_fires`,
  `late_slots`; waiting: `until`, `sleep_until`.
"""

from __future__ import annotations

import json
import math
import re
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pymongo
import pytest

from tests.conftest import REAL_MONGODB_URI
from tests.support.processes import DaemonProcess
from tests.support.wire_server import with_database

WIRE_LANE_ONLY = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not REAL_MONGODB_URI,
        reason="crash and outage tests run only on the wire lane: set "
               "MWAPJOBS_TEST_MONGODB_URI to a real MongoDB-wire server (README, Quick start)"),
]

QUEUE = "effect"
RUNS = "mwapjobs_runs"
EFFECTS = "test_effects"
SCHEDULER_JOBS = "mwapjobs_scheduler_jobs"
PENDING = ("delayed", "waiting", "active")
CLOSED_CLIENT = "Cannot use MongoClient after close"

# Short leases so that a killed process's runs come back within seconds (one process at a
# time renews its own runs, so nothing is taken from a live process).
FAST_RECOVERY = {"MWAPJOBS_ENGINE__LEASE_SECONDS": "4", "MWAPJOBS_ENGINE__SWEEP_INTERVAL": "1"}


def report(text: str) -> None:
    print(f"\n[crash] {text}", flush=True)


def until(predicate: Callable[[], Any], timeout: float, message: str | Callable[[], str],
          interval: float = 0.1) -> Any:
    """Poll `predicate` until it returns something true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout:g}s waiting for {text}")
        time.sleep(interval)


def sleep_until(wall_time: float) -> None:
    """A deliberate moment (an outage, a restart), not a wait for a condition."""
    time.sleep(max(0.0, wall_time - time.time()))


def epoch(value: datetime | str) -> float:
    return (datetime.fromisoformat(value) if isinstance(value, str) else value).timestamp()


class CrashDb:
    """The test's own database on the server of `base_uri`, read with pymongo."""

    def __init__(self, base_uri: str, **uri_options: str) -> None:
        self.name = f"crash_{uuid.uuid4().hex[:12]}"
        self.uri = with_database(base_uri, self.name, directConnection="true", **uri_options)
        self.client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
            with_database(base_uri, "", directConnection="true"), tz_aware=True,
            serverSelectionTimeoutMS=60_000)
        self.db = self.client[self.name]

    def runs(self, query: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        return list(self.db[RUNS].find({"queue": QUEUE, **(query or {})}))

    def job_runs(self) -> list[dict[str, Any]]:
        """Runs of seeded jobs (not of repeats)."""
        return self.runs({"data.n": {"$ne": None}})

    def repeat_runs(self, job_id: str) -> list[dict[str, Any]]:
        return sorted(self.runs({"jobId": job_id, "data.repeat": job_id}),
                      key=lambda r: r["createdAt"])

    def states(self) -> Counter[str]:
        return Counter(r["state"] for r in self.job_runs())

    def effects(self) -> list[dict[str, Any]]:
        return list(self.db[EFFECTS].find())

    def effect_count(self) -> int:
        return self.db[EFFECTS].count_documents({})

    def active_of(self, pid: int) -> set[str]:
        """Run ids still active under a lease of the process `pid` (its owner name is
        `host:pid:...`, the pid a field of its own)."""
        owner = re.compile(rf"(^|:){pid}(:|$)")  # host:pid:... (the format may grow)
        return {str(r["_id"]) for r in self.db[RUNS].find({"state": "active",
                                                            "leaseOwner": owner})}

    def active(self) -> set[str]:
        return {str(r["_id"]) for r in self.db[RUNS].find({"state": "active"})}

    def wake_triggers(self) -> int:
        return self.db[SCHEDULER_JOBS].count_documents({"_id": {"$regex": "^wake:"}})

    def next_run_time(self, repeat_id: str) -> float | None:
        doc = self.db[SCHEDULER_JOBS].find_one({"_id": f"repeat:{QUEUE}:{repeat_id}"})
        return float(doc["next_run_time"]) if doc and doc.get("next_run_time") else None

    def drop(self) -> None:
        self.client.drop_database(self.name)
        self.client.close()


@pytest.fixture
def processes() -> Iterator[list[DaemonProcess]]:
    started: list[DaemonProcess] = []
    yield started
    for p in started:
        p.stop()


@pytest.fixture
def shared_db() -> Iterator[CrashDb]:
    """A fresh database on the wire lane's server."""
    assert REAL_MONGODB_URI
    db = CrashDb(REAL_MONGODB_URI)
    yield db
    db.drop()


def effect_env(db: CrashDb, *, seed: list[dict[str, Any]] | None = None,
               repeats: list[dict[str, Any]] | None = None, concurrency: int | None = None,
               **settings: str) -> dict[str, str]:
    env = {
        "MONGODB_URI": db.uri,
        "MWAPJOBS_LOG_LEVEL": "info",
        # Only the engine and the test queue: no MWAP job types.
        "MWAPJOBS_REFRESH__ENABLED": "false",
        "MWAPJOBS_HEALTH__ENABLED": "false",
        **settings,
    }
    if seed:
        env["EFFECT_SEED"] = json.dumps(seed)
    if repeats:
        env["EFFECT_REPEATS"] = json.dumps(repeats)
    if concurrency is not None:
        env["EFFECT_CONCURRENCY"] = str(concurrency)
    return env


def start(processes: list[DaemonProcess], env: dict[str, str]) -> DaemonProcess:
    p = DaemonProcess(module="tests.support.effect_daemon", env=env)
    processes.append(p)
    return p


def wait_ready(p: DaemonProcess, timeout: float = 90) -> None:
    p.wait_http("/readyz", 200, timeout)


def sigterm(p: DaemonProcess, timeout: float) -> tuple[int, float]:
    """SIGTERM and wait for the exit: (exit code, seconds it took)."""
    t0 = time.monotonic()
    p.proc.send_signal(signal.SIGTERM)
    code = p.proc.wait(timeout)
    p.join_output()
    return code, time.monotonic() - t0


def log_problems(p: DaemonProcess) -> list[str]:
    """Tracebacks (in stderr, or a log line's `exception`) and uses of a closed client,
    each shortened to its message and the exception's last line."""
    problems = []
    for entry in list(p.lines):
        text = json.dumps(entry)
        if "Traceback" in text or CLOSED_CLIENT in text:
            lines = f"{entry.get('message')}\n{entry.get('exception', '')}".strip().splitlines()
            summary = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
            problems.append(f"log {entry.get('logger')}: {summary}"[:300])
    problems += [f"stdout: {line.strip()[:300]}" for line in p.bad_lines]
    block: list[str] = []
    for line in [*p.err, ""]:
        if line.startswith("Traceback") or line.startswith("Exception in thread"):
            block = [line.strip()]
        elif block and (line.startswith(" ") or not line.strip()) and line.strip():
            block.append(line.strip())
        elif block:
            problems.append(f"stderr: {block[0]} ... {line.strip() or block[-1]}"[:300])
            block = []
        elif CLOSED_CLIENT in line:
            problems.append(f"stderr: {line.strip()[:300]}")
    return problems


def skip_times(p: DaemonProcess, job_id: str) -> list[float]:
    """When `p` logged a fire of repeat `job_id` that made no run ("repeat fire skipped:
    the previous run is still pending"): the clock ticked all the same."""
    return [epoch(e["timestamp"]) for e in list(p.lines)
            if "repeat fire" in str(e.get("message")) and e.get("jobId") == job_id]


@dataclass
class Tally:
    runs: int
    states: Counter[str]
    missing: list[int]          # seeded job numbers without any effect
    extra: dict[str, int]       # run id -> effects beyond the first
    unexplained: dict[str, str]  # run id -> why its extra effects are not allowed

    @property
    def duplicates(self) -> int:
        return sum(self.extra.values())


def tally(db: CrashDb, expected: set[int], allowed: Counter[str] | None = None) -> Tally:
    """Effects against runs: which jobs never happened, which runs happened more than
    once, and which of those were not running when a process died (`allowed`: run id ->
    how many times it was active at a kill or an outage)."""
    allowed = allowed or Counter()
    runs = db.job_runs()
    effects = [e for e in db.effects() if e.get("n") is not None]
    per_run = Counter(e["runId"] for e in effects)
    extra = {run_id: count - 1 for run_id, count in per_run.items() if count > 1}
    unexplained = {run_id: f"{n + 1} effects, active at {allowed[run_id]} kill(s)/outage(s)"
                   for run_id, n in extra.items() if n > allowed[run_id]}
    seen = {e["n"] for e in effects}
    return Tally(len(runs), Counter(r["state"] for r in runs), sorted(expected - seen), extra,
                 unexplained)


def seed_lines(*ps: DaemonProcess) -> list[str]:
    """What each process said about its seed (for failure messages)."""
    return [f"pid {p.pid}: {e.get('message')} {e.get('added')}/{e.get('skipped')}"
            f"{' ' + str(e.get('error')) if e.get('error') else ''}"
            for p in ps for e in list(p.lines) if "effect" in str(e.get("message"))
            and ("seed" in str(e.get("message")) or "prepare" in str(e.get("message")))]


def wait_seeded(p: DaemonProcess, timeout: float = 90) -> None:
    """Until `p` has added its EFFECT_SEED jobs (an add that never returns fails here)."""
    try:
        p.wait_line(lambda e: e.get("message") == "effect seed done", timeout)
    except AssertionError:
        raise AssertionError(f"pid {p.pid} did not finish adding its jobs within {timeout:g}s: "
                             f"{seed_lines(p)}; last lines {p.raw[-5:]} {p.err[-5:]}") from None


def all_done(db: CrashDb, expected_runs: int) -> bool:
    states = db.states()
    return sum(states.values()) >= expected_runs and not any(states[s] for s in PENDING)


# -- repeats: fires and their slots -------------------------------------------------------


def grid_slot(t: float, origin: float, period: float) -> float:
    """The latest slot of the grid `origin + k * period` at or before `t`: the slot
    APScheduler fires for at `t` (a late fire coalesces into the latest due slot)."""
    return origin + math.floor((t - origin) / period + 1e-9) * period


def double_fires(runs: list[dict[str, Any]], origin: float,
                 period: float) -> dict[str, list[float]]:
    """Slots that got more than one run: one repeat fired twice for one slot. A run's
    slot is its `slot` field where the engine records one, else the grid slot of its
    createdAt."""
    slots: dict[str, list[float]] = {}
    for run in runs:
        created = epoch(run["createdAt"])
        slot = run.get("slot") or f"grid@{grid_slot(created, origin, period):.3f}"
        slots.setdefault(str(slot), []).append(created)
    return {s: ts for s, ts in slots.items() if len(ts) > 1}


def late_slots(fires: list[float], origin: float, period: float, start: float, end: float,
               tolerance: float) -> list[float]:
    """Slots in [start, end] without a fire within `tolerance` seconds after them."""
    first = origin + math.ceil((start - origin) / period) * period
    missed = []
    slot = first
    while slot <= end:
        if not any(slot - 0.1 <= f <= slot + tolerance for f in fires):
            missed.append(round(slot, 3))
        slot += period
    return missed
