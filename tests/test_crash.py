"""Crash and outage tests on real processes and a real MongoDB-wire server.

Every test starts real daemons (`python -m tests.support.effect_daemon`: the real
`Daemon`, configured like `mwapjobs serve`, with one `effect` queue whose jobs write one
document to `test_effects` per execution) and kills, stops, restarts or starves them of
their database, then checks the run documents and the effects against the README's
guarantee: at least once, nothing silently lost, and a job runs again only if it was
running when its process died.

They run only on the wire lane (`MWAPJOBS_TEST_MONGODB_URI`, see README "Quick start");
the outage tests also need their own server to freeze and kill (`secantus_server`).
Each test uses its own database, dropped afterwards. Figures are printed: `pytest -s`.

Timing: the tests wait on conditions, polling every 0.1 s or so, with generous overall
timeouts because the server (SecantusDB, in Python) is slower than mongod. The only
sleeps are deliberate moments (a kill at a random moment, an outage of 30 s, a
downtime of 65 s), never a wait that hopes something has happened by then.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import threading
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
from tests.support.wire_server import SecantusServer, with_database

pytestmark = [
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


# -- the tests ------------------------------------------------------------------------------


def test_sigkill_loop_loses_nothing_and_repeats_only_runs_that_were_running(
    shared_db: CrashDb, processes: list[DaemonProcess],
) -> None:
    """500 jobs; the daemon is SIGKILLed 10 times at random moments and restarted."""
    seed = int(os.environ.get("MWAPJOBS_CRASH_SEED") or time.time())
    rng = random.Random(seed)
    jobs: list[dict[str, Any]] = []
    for n in range(450):
        job: dict[str, Any] = {"n": n, "jobId": f"job-{n}",
                               "seconds": round(rng.uniform(0.2, 2.0), 2)}
        if n % 9 == 0:
            job["delay"] = round(rng.uniform(10, 30), 1)
        elif rng.random() < 0.35:
            job["delay"] = round(rng.uniform(1, 30), 1)
        jobs.append(job)
        if n % 9 == 0:  # the same job id again while its first run is pending: deduplicated
            jobs.append(dict(job))
    assert len(jobs) == 500
    expected = {j["n"] for j in jobs}
    env = effect_env(shared_db, seed=jobs, concurrency=10, **FAST_RECOVERY,
                     # The kills come from outside; a job active at several of them is
                     # not a poison job, so it must not be failed as stalled.
                     MWAPJOBS_ENGINE__STALLED_LIMIT="20")
    t0 = time.monotonic()
    active_at_kill: Counter[str] = Counter()
    kills: list[str] = []
    p = start(processes, env)
    for _ in range(10):
        time.sleep(rng.uniform(0.5, 5.0))  # a random moment, deliberately
        assert p.proc.poll() is None, f"the daemon died by itself: {p.err[-10:]}"
        p.kill()
        active = shared_db.active_of(p.pid)
        active_at_kill.update(active)
        kills.append(f"{time.monotonic() - t0:.1f}s:{len(active)} active")
        p = start(processes, env)
    report(f"sigkill loop (seed {seed}): kills at {', '.join(kills)}")

    def progress() -> str:
        return f"all runs to finish; now {dict(shared_db.states())}; {seed_lines(p)}"

    until(lambda: p.proc.poll() is not None or all_done(shared_db, len(expected)), 300,
          progress, interval=0.25)
    assert p.proc.poll() is None, f"the last daemon died: {p.err[-10:]}"
    deadline = time.monotonic() + 30  # fired triggers are removed right after their fire
    while (wake_left := shared_db.wake_triggers()) and time.monotonic() < deadline:
        time.sleep(0.25)
    result = tally(shared_db, expected, active_at_kill)
    runs_per_job = Counter(r["jobId"] for r in shared_db.job_runs())
    stuck = sum(result.states[s] for s in PENDING)
    report(f"sigkill loop: {len(jobs)} adds, {result.runs} runs, {len(kills)} kills, "
           f"{len(active_at_kill)} runs active at a kill, {result.duplicates} duplicate "
           f"effects (runs: {len(result.extra)}), {stuck} stuck, states "
           f"{dict(result.states)}, {wake_left} wake triggers left, "
           f"{time.monotonic() - t0:.1f}s")
    assert result.states == Counter({"completed": len(expected)}), (
        f"every run must complete, none left active/waiting/delayed: {dict(result.states)}")
    assert not result.missing, f"jobs whose effect never happened: {result.missing[:20]}"
    assert not result.unexplained, (
        f"effects repeated for runs that were not running at a kill: {result.unexplained}")
    assert all(c == 1 for c in runs_per_job.values()), (
        f"job ids with more than one run: {[j for j, c in runs_per_job.items() if c > 1]}")
    assert wake_left == 0, f"{wake_left} 'wake:' triggers left in {SCHEDULER_JOBS}"


def test_poison_job_fails_as_stalled_and_takes_no_innocent_run_with_it(
    shared_db: CrashDb, processes: list[DaemonProcess],
) -> None:
    """One job kills its process every time; the process is restarted whenever it dies."""
    rng = random.Random(7)
    jobs: list[dict[str, Any]] = [{"n": n, "jobId": f"job-{n}",
                                   "seconds": round(rng.uniform(0.5, 2.0), 2)}
                                  for n in range(50)]
    jobs.insert(12, {"n": 999, "jobId": "poison", "seconds": 0.5, "poison": True})
    env = effect_env(shared_db, seed=jobs, concurrency=10, **FAST_RECOVERY)  # stalled_limit 1
    t0 = time.monotonic()
    deaths: list[str] = []
    p = start(processes, env)
    deadline = time.monotonic() + 300
    while not all_done(shared_db, len(jobs)):
        if p.proc.poll() is not None:
            p.join_output()
            deaths.append(f"exit {p.proc.returncode} with "
                          f"{len(shared_db.active_of(p.pid))} active")
            assert len(deaths) <= 10, f"still dying after 10 restarts: {deaths}"
            p = start(processes, env)
        assert time.monotonic() < deadline, (
            f"runs still pending after 300s: {dict(shared_db.states())}; deaths {deaths}")
        time.sleep(0.1)
    runs = {r["jobId"]: r for r in shared_db.job_runs()}
    poison = runs.pop("poison")
    innocent_failed = {j: (r.get("error") or {}).get("type") for j, r in runs.items()
                       if r["state"] != "completed"}
    co_stalled = sum(1 for r in runs.values() if r.get("stalledCount"))
    report(f"poison: {len(deaths)} deaths ({'; '.join(deaths)}), poison "
           f"{poison['state']}/{(poison.get('error') or {}).get('type')} after "
           f"{poison.get('stalledCount')} stalls, {co_stalled} innocent runs stalled with it, "
           f"{len(innocent_failed)} innocent runs not completed: {innocent_failed}, "
           f"{time.monotonic() - t0:.1f}s")
    assert all(d.startswith("exit 137 ") for d in deaths), f"unexpected deaths: {deaths}"
    assert poison["state"] == "failed" and poison["error"]["type"] == "Stalled", poison
    assert not innocent_failed, (
        f"innocent runs taken down with the poison job (job id: error type): {innocent_failed}")
    assert not tally(shared_db, {j["n"] for j in jobs} - {999}).missing


@pytest.mark.parametrize("shutdown_timeout", [1.0, 30.0])
def test_sigterm_under_load_drains_loses_nothing_and_runs_nothing_twice(
    shared_db: CrashDb, processes: list[DaemonProcess], shutdown_timeout: float,
) -> None:
    rng = random.Random(11)
    jobs: list[dict[str, Any]] = []
    for n in range(120):
        job: dict[str, Any] = {"n": n, "jobId": f"job-{n}",
                               "seconds": round(rng.uniform(0.2, 2.0), 2)}
        if n >= 90:
            job["delay"] = round(rng.uniform(1, 20), 1)
        jobs.append(job)
    env = effect_env(shared_db, seed=jobs, concurrency=10, **FAST_RECOVERY,
                     MWAPJOBS_SHUTDOWN_TIMEOUT=f"{shutdown_timeout:g}")
    t0 = time.monotonic()
    p = start(processes, env)
    wait_ready(p)
    until(lambda: shared_db.effect_count() >= 40, 120, "40 effects before the SIGTERM")
    running = len(shared_db.active_of(p.pid))
    code, took = sigterm(p, shutdown_timeout + 60)
    left_active = shared_db.active()
    handed_back = sum(e.get("count", 0) for e in p.lines
                      if e.get("message", "").startswith("shutdown timeout"))
    p2 = start(processes, env)
    until(lambda: p2.proc.poll() is not None or all_done(shared_db, len(jobs)), 180,
          lambda: f"all runs to finish after the restart; now {dict(shared_db.states())}; "
                  f"{seed_lines(p, p2)}",
          interval=0.25)
    code2, took2 = sigterm(p2, shutdown_timeout + 60)
    result = tally(shared_db, {j["n"] for j in jobs})
    report(f"sigterm (shutdown_timeout {shutdown_timeout:g}s): {running} running at SIGTERM, "
           f"exit {code} after {took:.2f}s, {handed_back} handed back, {len(left_active)} left "
           f"active; restart: exit {code2} after {took2:.2f}s; {result.runs} runs "
           f"{dict(result.states)}, {result.duplicates} duplicate effects, "
           f"{len(result.missing)} missing, {time.monotonic() - t0:.1f}s")
    assert code == 0, f"exit code {code} on SIGTERM: {p.err[-10:]}"
    assert took < shutdown_timeout + 10, f"took {took:.1f}s to stop"
    assert not left_active, f"runs left active by a graceful stop: {sorted(left_active)}"
    assert result.states == Counter({"completed": len(jobs)}), dict(result.states)
    assert not result.missing, f"jobs whose effect never happened: {result.missing}"
    assert not result.extra, f"runs executed twice across a SIGTERM: {result.extra}"
    assert code2 == 0
    assert not log_problems(p) and not log_problems(p2), log_problems(p) + log_problems(p2)


class Prober(threading.Thread):
    """GET `path` every `interval` seconds; records (wall time, seconds, status or None)."""

    def __init__(self, p: DaemonProcess, path: str, interval: float,
                 timeout: float = 5.0) -> None:
        super().__init__(daemon=True)
        self.p, self.path, self.interval, self.timeout = p, path, interval, timeout
        self.samples: list[tuple[float, float, int | None]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            at, t0 = time.time(), time.perf_counter()
            try:
                status: int | None = self.p.get(self.path, self.timeout)[0]
            except (OSError, ValueError):
                status = None
            took = time.perf_counter() - t0
            self.samples.append((at, took, status))
            self.done.wait(max(0.0, self.interval - took))

    def stop(self) -> None:
        self.done.set()
        self.join(self.timeout + 5)


class LagSampler(threading.Thread):
    """`mwapjobs_event_loop_lag_seconds{stat="max"}` from /metrics, every second."""

    def __init__(self, p: DaemonProcess) -> None:
        super().__init__(daemon=True)
        self.p = p
        self.samples: list[tuple[float, float]] = []
        self.failures = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                value = self.p.metric("mwapjobs_event_loop_lag_seconds", 'stat="max"', 15)
            except (OSError, ValueError):
                value = None
            if value is None:
                self.failures += 1
            else:
                self.samples.append((time.time(), value))
            self.done.wait(1.0)

    def stop(self) -> None:
        self.done.set()
        self.join(20)


OUTAGE_SECONDS = 30.0
HEALTHZ_BUDGET = 0.1      # seconds, every probe during the outage
READYZ_NOTICE = 5.0       # seconds from the outage's start to a 503 from /readyz
LOG_LINES_PER_SECOND = 20  # warning + error lines, averaged over the outage
LOOP_LAG_BUDGET = 0.25    # seconds, the loop's worst lag around the outage
BEAT_EVERY = 30.0         # a repeat with one slot in the middle of the outage
TICK_EVERY = 5.0          # a repeat that shows the clock runs after the outage


@pytest.mark.parametrize("outage", ["freeze", "kill"])
def test_database_outage_keeps_the_daemon_healthy_and_loses_nothing(
    outage: str, secantus_server: Callable[[], SecantusServer],
    processes: list[DaemonProcess],
) -> None:
    """The daemon's server is frozen (SIGSTOP) for 30 s, or killed (SIGKILL) and started
    again 30 s later (journaled writes), while jobs run, fall due and repeats fire."""
    server = secantus_server()
    options = {"journal": "true"} if outage == "kill" else {}
    db = CrashDb(f"mongodb://127.0.0.1:{server.port}", **options)
    rng = random.Random(23)
    t_s = time.time()
    jobs: list[dict[str, Any]] = []

    def add(count: int, window: tuple[float, float] | None, seconds: tuple[float, float]) -> None:
        for _ in range(count):
            n = len(jobs)
            job: dict[str, Any] = {"n": n, "jobId": f"job-{n}",
                                   "seconds": round(rng.uniform(*seconds), 2)}
            if window:
                job["at"] = t_s + rng.uniform(*window)
            jobs.append(job)

    # The outage starts 17 s after t_s, and the beat's first slot is about 15 s into it.
    add(20, None, (0.2, 1.0))          # at once
    add(40, (12, 17), (1.0, 3.0))      # running when the outage starts
    add(60, (17, 47), (0.2, 2.0))      # falling due during the outage
    add(30, (47, 57), (0.2, 1.0))      # after it
    repeats = [{"jobId": "beat", "every": BEAT_EVERY}, {"jobId": "tick", "every": TICK_EVERY}]
    # Defaults for MongoDB (ping every 5 s, 5 s timeouts) and the lease (30 s): what
    # production runs. A shorter sweep only makes the test quicker.
    env = effect_env(db, seed=jobs, repeats=repeats, concurrency=10,
                     MWAPJOBS_ENGINE__SWEEP_INTERVAL="5")
    p = start(processes, env)
    wait_ready(p)
    p.wait_line(lambda e: e.get("message") == "effect repeats set", 30)
    beat_at = until(lambda: db.next_run_time("beat"), 10, "the beat's trigger")
    tick_origin = until(lambda: db.next_run_time("tick"), 10, "the tick's trigger")
    t_out = t_s + 17
    # The plan: the beat's first slot (30 s after the daemon made it) falls well inside the
    # outage, and its next one well after it, so a catch-up fire cannot be mistaken for it.
    assert time.time() < t_out - 6 and t_out + 8 < beat_at < t_out + OUTAGE_SECONDS - 5, (
        f"the daemon took too long to start for this test's plan ({beat_at - t_s:.1f}s)")
    sleep_until(t_out - 5)
    probes = [Prober(p, "/healthz", 0.1), Prober(p, "/readyz", 0.1)]
    lag = LagSampler(p)
    for thread in (*probes, lag):
        thread.start()
    sleep_until(t_out)

    before = db.active()
    t_out = time.time()
    if outage == "freeze":
        server.freeze()
    else:
        server.kill()
    while time.time() < t_out + OUTAGE_SECONDS:
        assert p.proc.poll() is None, f"the daemon exited during the outage: {p.err[-10:]}"
        time.sleep(0.1)
    if outage == "freeze":
        server.thaw()
    else:
        server.restart()
    t_back = time.time()
    after = db.active()
    wait_ready(p, 60)
    t_ready = time.time()
    sleep_until(t_ready + 13)  # the probes go on: the clock must keep time afterwards
    for thread in (*probes, lag):
        thread.stop()

    until(lambda: p.proc.poll() is not None or all_done(db, len(jobs)), 180,
          lambda: f"all runs to finish after the outage; now {dict(db.states())}; "
                  f"{seed_lines(p)}",
          interval=0.25)
    assert p.proc.poll() is None, f"the daemon exited after the outage: {p.err[-10:]}"

    healthz = [(at, took, st) for at, took, st in probes[0].samples if t_out <= at <= t_back]
    slow_healthz = [(round(at - t_out, 1), round(took, 3), st) for at, took, st in healthz
                    if took >= HEALTHZ_BUDGET or st != 200]
    first_503 = next((at for at, _, st in probes[1].samples if at >= t_out and st == 503), None)
    notice = None if first_503 is None else first_503 - t_out
    noisy = [e for e in p.lines if e.get("level") in ("warning", "error")
             and t_out <= epoch(e["timestamp"]) <= t_back]
    per_second = len(noisy) / (t_back - t_out)
    busiest = max(Counter(int(epoch(e["timestamp"])) for e in noisy).values(), default=0)
    lags = [value for at, value in lag.samples if t_out - 5 <= at <= t_ready + 13]
    worst_lag = max(lags, default=None)
    allowed = Counter(before | after)
    result = tally(db, {j["n"] for j in jobs}, allowed)
    stalled = [str(r["_id"]) for r in db.job_runs() if r.get("stalledCount")]
    beats = [epoch(r["createdAt"]) for r in db.repeat_runs("beat")]
    beat_fires = sorted(beats + skip_times(p, "beat"))
    catch_up_by = min(t_back + 12, beat_at + BEAT_EVERY - 0.5)  # before the next regular slot
    catch_up = [t for t in beat_fires if t_out < t <= catch_up_by]
    tick_fires = sorted([epoch(r["createdAt"]) for r in db.repeat_runs("tick")]
                        + skip_times(p, "tick"))
    tick_late = late_slots(tick_fires, tick_origin, TICK_EVERY, t_ready + 3, t_ready + 12, 2.0)
    report(
        f"outage ({outage}, {t_back - t_out:.1f}s): /healthz {len(healthz)} probes, max "
        f"{max((t for _, t, _ in healthz), default=0) * 1000:.0f} ms, {len(slow_healthz)} "
        f"over {HEALTHZ_BUDGET * 1000:.0f} ms or failed; /readyz 503 after "
        f"{'never' if notice is None else f'{notice:.1f}s'}, 200 again "
        f"{t_ready - t_back:.1f}s after the server was back; {len(noisy)} warning/error "
        f"lines ({per_second:.1f}/s, busiest second {busiest}); loop lag max "
        f"{worst_lag if worst_lag is None else f'{worst_lag * 1000:.0f} ms'} "
        f"({len(lags)} samples, {lag.failures} failed scrapes); runs active at the outage "
        f"{len(allowed)}; {result.runs} runs {dict(result.states)}, {result.duplicates} "
        f"duplicate effects, {len(stalled)} runs recovered as stalled, "
        f"{len(result.missing)} missing; beat slot {beat_at - t_out:.1f}s into the outage, "
        f"fires after it at {[round(t - t_out, 1) for t in beat_fires if t > t_out]}; tick "
        f"slots late after the outage {len(tick_late)}")
    assert not slow_healthz, (
        f"/healthz over {HEALTHZ_BUDGET}s or failing during the outage "
        f"(s into it, s, status): {slow_healthz[:20]}")
    assert notice is not None and notice <= READYZ_NOTICE, (
        f"/readyz said 503 only {notice}s after the outage started (budget {READYZ_NOTICE}s)")
    # Bound on log volume during the outage: at most 20 warning/error lines per second,
    # averaged over it (a handful of loops report each failure, they must not spin).
    assert per_second <= LOG_LINES_PER_SECOND, (
        f"{len(noisy)} warning/error lines in {t_back - t_out:.0f}s: {per_second:.1f}/s")
    assert worst_lag is not None and worst_lag <= LOOP_LAG_BUDGET, (
        f"event-loop lag max {worst_lag}s around the outage (budget {LOOP_LAG_BUDGET}s)")
    assert result.states == Counter({"completed": len(jobs)}), dict(result.states)
    assert not result.missing, f"jobs whose effect never happened: {result.missing}"
    assert not result.unexplained, (
        f"effects repeated for runs that were not active at the outage: {result.unexplained}")
    assert not stalled, (
        f"outcomes lost in the outage: {len(stalled)} runs were recovered as stalled although "
        f"their process never died: {stalled[:10]}")
    assert catch_up, (
        f"the beat slot inside the outage ({beat_at - t_out:.1f}s in) never fired by "
        f"{catch_up_by - t_back:.1f}s after the server was back (the next regular slot: "
        f"{beat_at + BEAT_EVERY - t_back:.1f}s after)")
    assert not tick_late, f"tick slots without a fire after the outage: {tick_late}"


def test_brief_database_errors_lose_no_repeat_fire_no_outcome_and_keep_the_clock(
    secantus_server: Callable[..., SecantusServer], processes: list[DaemonProcess],
) -> None:
    """Network errors for two seconds at a time: the server closes the daemon's connection
    whenever it sends certain commands (a `failCommand` failpoint for its appName). First
    `insert`, around the slot of a repeat every 20 s (the fire cannot write its run, while
    APScheduler's own queries work); ten seconds later `update` and `delete`, while jobs
    finish, delayed runs fall due and a repeat every 2 s moves its trigger (outcomes,
    claims, trigger updates and removals fail). The jobs' own effects are `findAndModify`
    upserts, untouched by either. The slow repeat's slot must still get its run before
    its next slot (a retried fire may come late, not never), the fast one must keep
    firing on time afterwards, and no outcome may be lost."""
    server = secantus_server("--enable-test-commands")
    db = CrashDb(f"mongodb://127.0.0.1:{server.port}")
    rng = random.Random(41)
    slow, fast = 20.0, 2.0
    jobs: list[dict[str, Any]] = []
    for n in range(120):
        job: dict[str, Any] = {"n": n, "jobId": f"job-{n}",
                               "seconds": round(rng.uniform(0.3, 1.5), 2)}
        if n >= 40:
            job["delay"] = round(rng.uniform(3, 35), 1)
        jobs.append(job)
    repeats = [{"jobId": "beat", "every": slow}, {"jobId": "tick", "every": fast}]
    env = effect_env(db, seed=jobs, repeats=repeats, concurrency=10, **FAST_RECOVERY)
    p = start(processes, env)
    wait_ready(p)
    wait_seeded(p)
    beat_at = until(lambda: db.next_run_time("beat"), 10, "the beat's trigger")
    tick_origin = until(lambda: db.next_run_time("tick"), 10, "the tick's trigger")
    assert beat_at > time.time() + 1, "the daemon took too long to start for this test's plan"
    phases = [(beat_at, ["insert"]), (beat_at + 10, ["update", "delete"])]
    for at, commands in phases:
        sleep_until(at - 0.5)
        server.fail_commands(commands)
        sleep_until(at + 1.5)
        server.heal()
        assert p.proc.poll() is None, f"the daemon exited: {p.err[-10:]}"
    errors_end = phases[-1][0] + 1.5
    sleep_until(errors_end + 13)
    until(lambda: p.proc.poll() is not None or all_done(db, len(jobs)), 120,
          lambda: f"all runs to finish; now {dict(db.states())}; {seed_lines(p)}",
          interval=0.25)
    assert p.proc.poll() is None, f"the daemon exited: {p.err[-10:]}"

    beat_fires = sorted([epoch(r["createdAt"]) for r in db.repeat_runs("beat")]
                        + skip_times(p, "beat"))
    beat_fired = [round(f - beat_at, 2) for f in beat_fires
                  if beat_at - 0.1 <= f < beat_at + slow - 0.5]
    tick_fires = sorted([epoch(r["createdAt"]) for r in db.repeat_runs("tick")]
                        + skip_times(p, "tick"))
    # The clock may pause after an error before it tries again; from 6 s on it must keep time.
    late = late_slots(tick_fires, tick_origin, fast, errors_end + 6, errors_end + 12, 1.5)
    stalled = [str(r["_id"]) for r in db.job_runs() if r.get("stalledCount")]
    result = tally(db, {j["n"] for j in jobs})
    problems = log_problems(p)
    report(f"database errors: the slow repeat's slot (inserts failing) fired at "
           f"{beat_fired} s after it; the fast one: {len(late)} late slots after the errors; "
           f"{result.runs} runs {dict(result.states)}, {len(stalled)} recovered as stalled, "
           f"{result.duplicates} duplicate effects, {len(result.missing)} missing; "
           f"log problems {problems[:5]}")
    assert beat_fired, (
        f"the repeat's fire at a moment of failing inserts was lost: no run for that slot "
        f"before the next one, {slow:g}s later (log problems: {problems[:5]})")
    assert not late, (
        f"the clock stopped after failing updates/deletes: slots without a fire "
        f"(s after the errors): {[round(s - errors_end, 1) for s in late]}; log problems: "
        f"{problems}")
    assert not stalled, (
        f"outcomes lost: {len(stalled)} runs were recovered as stalled although their process "
        f"never died")
    assert result.states == Counter({"completed": len(jobs)}), dict(result.states)
    assert not result.missing, f"jobs whose effect never happened: {result.missing}"
    assert not result.extra, f"runs executed twice with no process killed: {result.extra}"


def test_missed_repeats_coalesce_into_one_run_at_restart(
    shared_db: CrashDb, processes: list[DaemonProcess],
) -> None:
    """`every 5 s` and `* * * * *`; the daemon is stopped for 62+ s, then restarted."""
    every = 5.0
    repeats = [{"jobId": "tick", "every": every}, {"jobId": "minute", "cron": "* * * * *"}]
    env = effect_env(shared_db, repeats=repeats, **FAST_RECOVERY)
    spawned = time.time()
    p = start(processes, env)
    started = epoch(p.wait_line(lambda e: e.get("message") == "engine started", 90)["timestamp"])
    latency = started - spawned
    wait_ready(p)
    p.wait_line(lambda e: e.get("message") == "effect repeats set", 30)
    until(lambda: shared_db.repeat_runs("tick"), 30, "a tick run")
    code, _ = sigterm(p, 60)
    assert code == 0
    t_stop = time.time()
    tick_origin = shared_db.next_run_time("tick")
    minute_next = shared_db.next_run_time("minute")
    assert tick_origin and minute_next

    # Restart so that the engine comes up mid-way between two tick slots and away from a
    # minute boundary: then "before the next slot" is one fire, whatever the latency.
    t_spawn = t_stop + 62
    while True:
        at = t_spawn + latency
        if abs((at - tick_origin) % every - every / 2) < 0.3 and 3 < at % 60 < 45:
            break
        t_spawn += 0.1
    sleep_until(t_spawn)
    down_runs = [r for r in shared_db.runs() if t_stop + 1 < epoch(r["createdAt"]) < t_spawn]
    p2 = start(processes, env)
    wait_ready(p2)
    up = epoch(p2.wait_line(lambda e: e.get("message") == "engine started", 30)["timestamp"])
    next_tick = tick_origin + math.ceil((up - tick_origin) / every) * every
    next_minute = math.ceil(up / 60) * 60
    sleep_until(max(next_tick + 2.0, up + 8))

    def fires(job_id: str) -> list[float]:
        created = [epoch(r["createdAt"]) for r in shared_db.repeat_runs(job_id)]
        return sorted([t for t in created if t > t_stop] + skip_times(p2, job_id))

    tick, minute = fires("tick"), fires("minute")
    tick_catch_up = [t for t in tick if t < next_tick]
    tick_regular = [t for t in tick if next_tick - 0.1 <= t < next_tick + 2.0]
    minute_catch_up = [t for t in minute if t < min(next_minute, up + 8)]
    report(f"catch-up: down {t_spawn - t_stop:.1f}s (missed about "
           f"{int((t_spawn - t_stop) // every)} tick slots, "
           f"{int((t_spawn - t_stop) // 60)}+ minute slots); engine up "
           f"{up - t_spawn:.1f}s after the spawn; tick fires at start "
           f"{[round(t - up, 2) for t in tick_catch_up]}, at the next slot "
           f"{len(tick_regular)}; minute fires at start "
           f"{[round(t - up, 2) for t in minute_catch_up]}")
    assert not down_runs, f"runs created while no daemon ran: {down_runs}"
    assert len(tick_catch_up) == 1, (
        f"the missed tick slots must coalesce into one run at start: "
        f"{len(tick_catch_up)} fires before the next slot")
    assert len(minute_catch_up) == 1, (
        f"the missed minute slots must coalesce into one run at start: "
        f"{len(minute_catch_up)} fires")
    assert tick_catch_up[0] - up < 5 and minute_catch_up[0] - up < 5, "the catch-up was late"
    assert len(tick_regular) == 1, f"the next regular tick fired {len(tick_regular)} times"
    assert sigterm(p2, 60)[0] == 0


BEAT = 2.0  # seconds between the fires of the two-instance tests' repeat


def _two_instance_seed(first: int, count: int, spread: float, rng: random.Random
                       ) -> list[dict[str, Any]]:
    return [{"n": n, "jobId": f"job-{n}", "seconds": round(rng.uniform(0.2, 1.0), 2),
             "delay": round(rng.uniform(0, spread), 1)} for n in range(first, first + count)]


def _check_beats(db: CrashDb, survivor: DaemonProcess, t_stop: float, phase: str) -> str:
    """No slot fired twice over the whole test; the survivor fired every slot on time
    for 12 s after the other process stopped. Returns the figures."""
    origin = db.next_run_time("beat")
    assert origin
    runs = db.repeat_runs("beat")
    created = [epoch(r["createdAt"]) for r in runs]
    doubled = double_fires(runs, origin, BEAT)
    fires = sorted(created + skip_times(survivor, "beat"))
    late = late_slots(fires, origin, BEAT, t_stop + BEAT, t_stop + 12, 1.5)
    figures = (f"{len(created)} beat runs, {len(doubled)} slots fired twice, "
               f"{len(late)} late slots after {phase}")
    shown = {slot: [round(t - t_stop, 2) for t in ts] for slot, ts in doubled.items()}
    assert not doubled, (
        f"a repeat fired twice for one slot (slot: runs' createdAt, seconds relative to "
        f"{phase}): {shown}")
    assert not late, (
        f"the survivor's clock stopped: slots without a fire after {phase} "
        f"(s after): {[round(s - t_stop, 1) for s in late]}; fires: "
        f"{[round(f - t_stop, 1) for f in fires if f > t_stop - 4]}; survivor's log "
        f"problems: {log_problems(survivor)}")
    return figures


def test_two_instances_on_one_database_fire_each_slot_once_and_survive_a_kill(
    shared_db: CrashDb, processes: list[DaemonProcess],
) -> None:
    rng = random.Random(31)
    repeats = [{"jobId": "beat", "every": BEAT}]
    # Delays up to 35 s: work is still running on both when A is killed.
    seed_a = _two_instance_seed(0, 100, 35, rng)
    seed_b = _two_instance_seed(100, 100, 35, rng)
    a = start(processes, effect_env(shared_db, seed=seed_a, repeats=repeats, **FAST_RECOVERY))
    wait_ready(a)
    a.wait_line(lambda e: e.get("message") == "effect repeats set", 30)
    b = start(processes, effect_env(shared_db, seed=seed_b, repeats=repeats, **FAST_RECOVERY))
    wait_ready(b)
    wait_seeded(a)
    wait_seeded(b)
    together = time.time()
    while time.time() < together + 18:
        assert a.proc.poll() is None and b.proc.poll() is None, (a.err[-5:], b.err[-5:])
        time.sleep(0.2)
    a_problems = log_problems(a)
    a.kill()
    t_stop = time.time()
    allowed = Counter(shared_db.active_of(a.pid))
    expected = {j["n"] for j in seed_a + seed_b}
    sleep_until(t_stop + 13)  # the survivor alone: its fires are checked below
    until(lambda: b.proc.poll() is not None or all_done(shared_db, len(expected)), 120,
          lambda: f"all {len(expected)} runs to finish; now {dict(shared_db.states())}; "
                  f"{seed_lines(a, b)}", interval=0.25)
    assert b.proc.poll() is None, f"the survivor died: {b.err[-10:]}"
    code, _ = sigterm(b, 60)
    result = tally(shared_db, expected, allowed)
    beats = _check_beats_report(shared_db, b, t_stop, "the kill")
    report(f"two instances: {result.runs} runs {dict(result.states)}, {len(allowed)} active "
           f"at the kill, {result.duplicates} duplicate effects, {beats[0]}; survivor exit "
           f"{code}; log problems: A {len(a_problems)}, B {len(log_problems(b))}")
    assert result.states == Counter({"completed": len(expected)}), dict(result.states)
    assert not result.missing, f"jobs whose effect never happened: {result.missing}"
    assert not result.unexplained, (
        f"effects repeated for runs that were not active at the kill: {result.unexplained}")
    beats[1]()
    assert code == 0
    assert not a_problems and not log_problems(b), a_problems + log_problems(b)


def test_blue_green_overlap_fires_each_slot_once_and_the_new_process_keeps_time(
    shared_db: CrashDb, processes: list[DaemonProcess],
) -> None:
    """The new process starts before the old one stops (SIGTERM), as in a blue/green
    deployment on one database."""
    rng = random.Random(37)
    repeats = [{"jobId": "beat", "every": BEAT}]
    seed = _two_instance_seed(0, 150, 30, rng)
    blue = start(processes, effect_env(shared_db, seed=seed, repeats=repeats, **FAST_RECOVERY))
    wait_ready(blue)
    blue.wait_line(lambda e: e.get("message") == "effect repeats set", 30)
    wait_seeded(blue)
    green = start(processes, effect_env(shared_db, repeats=repeats, **FAST_RECOVERY))
    wait_ready(green)
    overlap = time.time()
    while time.time() < overlap + 10:
        assert blue.proc.poll() is None and green.proc.poll() is None
        time.sleep(0.2)
    blue_code, blue_took = sigterm(blue, 60)
    t_stop = time.time()
    expected = {j["n"] for j in seed}
    sleep_until(t_stop + 13)
    until(lambda: green.proc.poll() is not None or all_done(shared_db, len(expected)), 120,
          lambda: f"all runs to finish; now {dict(shared_db.states())}; "
                  f"{seed_lines(blue, green)}", interval=0.25)
    assert green.proc.poll() is None, f"the new process died: {green.err[-10:]}"
    green_code, _ = sigterm(green, 60)
    result = tally(shared_db, expected)
    beats = _check_beats_report(shared_db, green, t_stop, "the old process stopped")
    report(f"blue/green: blue exit {blue_code} after {blue_took:.1f}s, green exit "
           f"{green_code}; {result.runs} runs {dict(result.states)}, {result.duplicates} "
           f"duplicate effects, {beats[0]}; log problems: blue {len(log_problems(blue))}, "
           f"green {len(log_problems(green))}")
    assert result.states == Counter({"completed": len(expected)}), dict(result.states)
    assert not result.missing, f"jobs whose effect never happened: {result.missing}"
    assert not result.extra, f"runs executed twice with no process killed: {result.extra}"
    beats[1]()
    assert blue_code == 0 and green_code == 0
    problems = log_problems(blue) + log_problems(green)
    assert not problems, problems


def _check_beats_report(db: CrashDb, survivor: DaemonProcess, t_stop: float,
                        phase: str) -> tuple[str, Callable[[], None]]:
    """The beat figures now (for the report) and the beat assertions for later, so that
    the report is printed before the first assertion fails."""
    try:
        return _check_beats(db, survivor, t_stop, phase), lambda: None
    except AssertionError as exc:
        failure = exc

        def fail() -> None:
            raise failure

        return f"beat check failed: {failure}", fail
