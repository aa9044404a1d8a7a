"""APScheduler's job store for repeat triggers, on `mwapjobs_scheduler_jobs`.

APScheduler's `MongoDBJobStore` speaks synchronous pymongo and is used only from the
scheduler's own thread and its I/O thread (`scheduler.Scheduler`), never from the event
loop. This subclass counts its queries, so the benchmarks and `/metrics` can report
the clock's round trips next to the application's.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from apscheduler.job import Job as ApsJob
from apscheduler.jobstores.mongodb import MongoDBJobStore


class CountingJobStore(MongoDBJobStore):  # type: ignore[misc]
    """`MongoDBJobStore` that counts its queries."""

    round_trips = 0

    def _count(self) -> None:
        self.round_trips += 1

    def lookup_job(self, job_id: str) -> Any:
        self._count()
        return super().lookup_job(job_id)

    def get_due_jobs(self, now: datetime) -> Any:
        self._count()
        return super().get_due_jobs(now)

    def get_next_run_time(self) -> Any:
        self._count()
        return super().get_next_run_time()

    def get_all_jobs(self) -> Any:
        self._count()
        return super().get_all_jobs()

    def add_job(self, job: ApsJob) -> None:
        self._count()
        super().add_job(job)

    def update_job(self, job: ApsJob) -> None:
        self._count()
        super().update_job(job)

    def remove_job(self, job_id: str) -> None:
        self._count()
        super().remove_job(job_id)

    def jobs_with_prefix(self, prefix: str) -> list[ApsJob]:
        """Jobs whose id starts with `prefix`, via an anchored (indexed) `_id` match.

        `_get_jobs` is APScheduler 3's own helper; the dependency pins <4.
        """
        self._count()
        jobs: list[ApsJob] = self._get_jobs({"_id": {"$regex": "^" + _escape(prefix)}})
        return jobs


def _escape(text: str) -> str:
    return "".join("\\" + c if not c.isalnum() and c not in "-_:" else c for c in text)
