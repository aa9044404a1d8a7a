"""Repeats across restarts and instances on real processes (tests/support/crash.py):
missed fires coalescing into one run at restart, two instances on one database (one of
them killed), a blue/green overlap."""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from tests.support import crash
from tests.support.crash import (
    FAST_RECOVERY,
    WIRE_LANE_ONLY,
    CrashDb,
    all_done,
    double_fires,
    effect_env,
    epoch,
    late_slots,
    log_problems,
    report,
    seed_lines,
    sigterm,
    skip_times,
    sleep_until,
    start,
    tally,
    until,
    wait_ready,
    wait_seeded,
)
from tests.support.processes import DaemonProcess

pytestmark = WIRE_LANE_ONLY

# This module's fixtures (tests/support/crash.py).
processes = crash.processes
shared_db = crash.shared_db


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
# A killed leader's lease must run out before the survivor leads: a short one here, and
# its clock is checked from then on (the lease, a follower's look, and a margin).
LEADER_LEASE = 3.0
TAKEOVER = LEADER_LEASE + 1.0 + 1.0


def _two_instance_seed(first: int, count: int, spread: float, rng: random.Random
                       ) -> list[dict[str, Any]]:
    return [{"n": n, "jobId": f"job-{n}", "seconds": round(rng.uniform(0.2, 1.0), 2),
             "delay": round(rng.uniform(0, spread), 1)} for n in range(first, first + count)]


def _check_beats(db: CrashDb, survivor: DaemonProcess, t_stop: float, phase: str,
                 takeover: float = 0.0) -> str:
    """No slot fired twice over the whole test; the survivor fired every slot on time
    for 12 s once it could lead (`takeover` s after the other process stopped). Returns
    the figures."""
    origin = db.next_run_time("beat")
    assert origin
    runs = db.repeat_runs("beat")
    created = [epoch(r["createdAt"]) for r in runs]
    doubled = double_fires(runs, origin, BEAT)
    fires = sorted(created + skip_times(survivor, "beat"))
    late = late_slots(fires, origin, BEAT, t_stop + takeover + BEAT, t_stop + takeover + 12,
                      1.5)
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
    lease = {"MWAPJOBS_ENGINE__LEADER_LEASE": f"{LEADER_LEASE:g}"}
    a = start(processes, effect_env(shared_db, seed=seed_a, repeats=repeats, **FAST_RECOVERY,
                                    **lease))
    wait_ready(a)
    a.wait_line(lambda e: e.get("message") == "effect repeats set", 30)
    b = start(processes, effect_env(shared_db, seed=seed_b, repeats=repeats, **FAST_RECOVERY,
                                    **lease))
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
    sleep_until(t_stop + TAKEOVER + 13)  # the survivor alone: its fires are checked below
    until(lambda: b.proc.poll() is not None or all_done(shared_db, len(expected)), 120,
          lambda: f"all {len(expected)} runs to finish; now {dict(shared_db.states())}; "
                  f"{seed_lines(a, b)}", interval=0.25)
    assert b.proc.poll() is None, f"the survivor died: {b.err[-10:]}"
    code, _ = sigterm(b, 60)
    result = tally(shared_db, expected, allowed)
    beats = _check_beats_report(shared_db, b, t_stop, "the kill", TAKEOVER)
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
                        phase: str, takeover: float = 0.0) -> tuple[str, Callable[[], None]]:
    """The beat figures now (for the report) and the beat assertions for later, so that
    the report is printed before the first assertion fails."""
    try:
        return _check_beats(db, survivor, t_stop, phase, takeover), lambda: None
    except AssertionError as exc:
        failure = exc

        def fail() -> None:
            raise failure

        return f"beat check failed: {failure}", fail
