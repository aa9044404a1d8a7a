"""Crash tests on real processes (tests/support/crash.py): a SIGKILL loop, a poison job
that kills its process every time, SIGTERM drains under load."""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from typing import Any

import pytest

from tests.support import crash
from tests.support.crash import (
    FAST_RECOVERY,
    PENDING,
    SCHEDULER_JOBS,
    WIRE_LANE_ONLY,
    CrashDb,
    all_done,
    effect_env,
    log_problems,
    report,
    seed_lines,
    sigterm,
    start,
    tally,
    until,
    wait_ready,
)
from tests.support.processes import DaemonProcess

pytestmark = WIRE_LANE_ONLY

# This module's fixtures (tests/support/crash.py).
processes = crash.processes
shared_db = crash.shared_db


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
