"""A real mwapjobs daemon with one test queue, `effect`, whose jobs leave a trace.

    python -m tests.support.effect_daemon

Settings come exactly as for `mwapjobs serve`: `load_settings(resolve_config_path(None))`,
so MONGODB_URI, MWAPJOBS_ENGINE__LEASE_SECONDS and every other variable apply. The
`effect` handler sleeps `data["seconds"]`, then inserts one document into `test_effects`:

    {runId, n, repeat, attempt, pid, at}

(as an upsert of a fresh `_id`, which is a `findAndModify` command: tests that make the
server fail the engine's `insert`, `update` or `delete` commands leave the job's own
write alone).

so a test can count how often each run's side effect happened. With `data["poison"]`
it calls `os._exit(137)` instead: a job that kills its process every time.

Environment of the test queue (all optional):
- EFFECT_CONCURRENCY: the queue's concurrency (default 10);
- EFFECT_SEED: JSON list of jobs `{"n", "seconds", "delay" | "at", "jobId", "poison"}` (`at`
  is a time in epoch seconds, for load that must fall due at a given moment), added
  once after the engine is up. A restart does not add them again: a job whose `jobId`
  already has a run (in any state) is skipped, and jobs without a `jobId` are added only
  while no run of the queue exists. Within one seed, a repeated `jobId` is added again
  (deduplicated by the engine while its first run is pending);
- EFFECT_REPEATS: JSON list of repeats `{"jobId", "every" | "cron", "seconds"}`, set after
  the engine is up (an identical definition is left as it is, so a restart keeps the
  schedule); each fire's run writes an effect with `repeat` = its jobId.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from datetime import UTC, datetime
from typing import Any

from bson import ObjectId

from mwapjobs.config import ConfigError, load_settings, resolve_config_path
from mwapjobs.daemon import Daemon
from mwapjobs.logs import setup_logging
from mwapjobs.queues import Job
from mwapjobs.signals import run_until_signalled

QUEUE = "effect"
EFFECTS = "test_effects"
RUNS = "mwapjobs_runs"

log = logging.getLogger("tests.effect_daemon")


def make_handler(daemon: Daemon) -> Any:
    async def effect(job: Job) -> dict[str, Any]:
        await asyncio.sleep(float(job.data.get("seconds", 0)))
        if job.data.get("poison"):
            os._exit(137)
        doc = {"runId": job.run_id, "n": job.data.get("n"), "repeat": job.data.get("repeat"),
               "attempt": job.attempt, "pid": os.getpid(), "at": datetime.now(UTC)}
        write = asyncio.ensure_future(daemon.mongo.call(lambda db: db[EFFECTS].find_one_and_update(
            {"_id": ObjectId()}, {"$setOnInsert": doc}, upsert=True)))
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            # Cancelled (shutdown timeout) while the effect was being written: the
            # effect happens anyway, so the run must count as done. Re-raising would
            # make the engine hand the run back and run it again, a duplicate that
            # this harness, not the engine, would have caused.
            await write
        return {"n": job.data.get("n"), "pid": os.getpid()}

    return effect


class Seed:
    """Adds the EFFECT_SEED jobs once; after a failure it goes on where it stopped."""

    def __init__(self, jobs: list[dict[str, Any]]) -> None:
        self.jobs = jobs
        self.position = 0
        self.known: set[str] | None = None  # job ids with a run before this process began
        self.any_run = False
        self.added = self.skipped = 0

    async def run(self, daemon: Daemon) -> None:
        if self.known is None:
            existing = await daemon.mongo.call(
                lambda db: db[RUNS].distinct("jobId", {"queue": QUEUE}))
            first = await daemon.mongo.call(lambda db: db[RUNS].find_one({"queue": QUEUE}))
            self.known = {j for j in existing if j is not None}
            self.any_run = first is not None
        known = self.known
        t0 = time.monotonic()
        while self.position < len(self.jobs):
            job = self.jobs[self.position]
            job_id = job.get("jobId")
            if (job_id is not None and job_id in known) or (job_id is None and self.any_run):
                self.skipped += 1
            else:
                data = {"n": job.get("n"), "seconds": float(job.get("seconds", 0))}
                if job.get("poison"):
                    data["poison"] = True
                run_at = (datetime.fromtimestamp(float(job["at"]), UTC)
                          if job.get("at") is not None else None)
                await daemon.engine.add(QUEUE, data, job_id=job_id, delay=job.get("delay"),
                                        run_at=run_at)
                self.added += 1
            self.position += 1
        log.info("effect seed done", extra={"added": self.added, "skipped": self.skipped,
                                            "seconds": round(time.monotonic() - t0, 3)})


async def set_repeats(daemon: Daemon, repeats: list[dict[str, Any]]) -> None:
    for spec in repeats:
        job_id = spec["jobId"]
        await daemon.engine.repeat(
            QUEUE, {"repeat": job_id, "seconds": float(spec.get("seconds", 0))},
            cron=spec.get("cron"), every=spec.get("every"), job_id=job_id,
            timezone=spec.get("timezone", "UTC"))
    log.info("effect repeats set", extra={"repeats": [r["jobId"] for r in repeats]})


async def prepare(daemon: Daemon) -> None:
    """After the engine is up: repeats, then the seed. Retried while MongoDB is away."""
    seed = Seed(json.loads(os.environ.get("EFFECT_SEED") or "[]"))
    repeats = json.loads(os.environ.get("EFFECT_REPEATS") or "[]")
    await daemon.wait_ready(timeout=3600)
    while True:
        try:
            if repeats:
                await set_repeats(daemon, repeats)
            if seed.jobs:
                await seed.run(daemon)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("effect prepare failed; retrying", extra={"error": repr(exc)[:300]})
            await asyncio.sleep(1)


async def main_async(daemon: Daemon) -> int:
    preparing = asyncio.ensure_future(prepare(daemon))
    try:
        return await run_until_signalled(daemon)
    finally:
        preparing.cancel()
        with contextlib.suppress(BaseException):
            await preparing


def main() -> int:
    try:
        settings = load_settings(resolve_config_path(None))
    except ConfigError as exc:
        print(f"effect_daemon: config error: {exc}", flush=True)
        return 2
    setup_logging(settings.log_level)
    daemon = Daemon(settings)
    concurrency = int(os.environ.get("EFFECT_CONCURRENCY") or 10)
    daemon.registry.register(QUEUE, make_handler(daemon), concurrency=concurrency,
                             attempts=3, backoff={"delay": 0.2})
    return asyncio.run(main_async(daemon))


if __name__ == "__main__":
    raise SystemExit(main())
