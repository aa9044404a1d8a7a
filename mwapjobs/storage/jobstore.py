"""APScheduler's job store for repeat triggers, on `mwapjobs_scheduler_jobs`, signed.

APScheduler stores each trigger as a pickle, and unpickling runs code: a document
planted in that collection by anyone who can write to the MWAP database would run
inside the daemon, which holds every tenant's tokens. So this store never unpickles
bytes it did not write:

- every `job_state` is signed with HMAC-SHA256 (`sig`), over the job id and the
  pickle, with a key that only the daemon has (`signing_key`: MWAPJOBS_SIGNING_KEY,
  or derived from ENCRYPTION_KEY with HKDF and a fixed label);
- a document with no signature, or a wrong one, is never unpickled: it is moved to
  `mwapjobs_scheduler_quarantine` (with why and when), removed from the store, and
  logged at error level; the `scheduler_documents_rejected` alert fires while the
  quarantine holds any. Triggers written before signing (mwapjobs 0.1) meet the
  same fate at the first start and are rebuilt by their owners (every repeat is
  declared again when the daemon starts);
- even a signed pickle is read by `_TriggerUnpickler`, which knows only the classes a
  trigger is made of, as a second wall.

It also counts its queries, for the benchmarks and `/metrics`. APScheduler calls it
from its own thread and from the scheduler's I/O thread, never from the event loop;
the event loop lists repeats through the database door instead (`with_prefix`, then
`readable`, which checks the same signatures).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import logging
import pickle
from datetime import UTC, datetime
from typing import Any

import bson
from apscheduler.job import Job as ApsJob
from apscheduler.jobstores.base import ConflictingIdError, JobLookupError
from apscheduler.jobstores.mongodb import MongoDBJobStore
from apscheduler.util import datetime_to_utc_timestamp
from bson.binary import Binary
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pymongo import ASCENDING, DESCENDING
from pymongo.errors import DuplicateKeyError

from ..config import Settings
from .mongo import Mongo
from .names import SCHEDULER_JOBS, SCHEDULER_QUARANTINE

log = logging.getLogger(__name__)

FIRE_REF = "mwapjobs.scheduler:fire"  # the only callable a trigger of ours names
_LABEL = b"mwapjobs scheduler job store signature v1"

# What a pickled APScheduler 3 job state of ours is made of (module -> names).
_ALLOWED: dict[str, frozenset[str]] = {
    "apscheduler.triggers.cron": frozenset({"CronTrigger"}),
    "apscheduler.triggers.cron.fields": frozenset({
        "BaseField", "WeekField", "DayOfMonthField", "DayOfWeekField", "MonthField"}),
    "apscheduler.triggers.cron.expressions": frozenset({
        "AllExpression", "RangeExpression", "WeekdayRangeExpression",
        "WeekdayPositionExpression", "LastDayOfMonthExpression", "MonthRangeExpression"}),
    "apscheduler.triggers.interval": frozenset({"IntervalTrigger"}),
    "mwapjobs.triggers": frozenset({"WallClockCronTrigger"}),
    "datetime": frozenset({"datetime", "timedelta", "timezone", "date"}),
    "zoneinfo": frozenset({"ZoneInfo"}),
}


def signing_key(secret: str) -> bytes:
    """The job store's HMAC key, derived from a secret of the daemon's (HKDF-SHA256)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=_LABEL).derive(secret.encode())


def configured_key(settings: Settings) -> bytes | None:
    """The key from MWAPJOBS_SIGNING_KEY, else one derived from ENCRYPTION_KEY, else none
    (then the job store is unsigned, as before signing existed)."""
    secret = settings.signing_key or settings.encryption_key
    value = secret.get_secret_value() if secret else ""
    return signing_key(value) if value else None


def _safe_getattr(obj: Any, name: str) -> Any:
    """`getattr` as pickle uses it for ZoneInfo (`ZoneInfo._unpickle`), and nothing else."""
    from zoneinfo import ZoneInfo

    if obj is ZoneInfo and name == "_unpickle":
        return ZoneInfo._unpickle  # type: ignore[attr-defined]
    raise pickle.UnpicklingError(f"attribute {name!r} is not allowed in a trigger")


class _TriggerUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "builtins" and name == "getattr":
            return _safe_getattr
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a trigger")


class RejectedDocument(Exception):
    """A stored trigger that is not ours; the message says why."""


class JobStore(MongoDBJobStore):  # type: ignore[misc]
    """`MongoDBJobStore` that signs what it writes, verifies what it reads, and counts."""

    round_trips = 0

    def __init__(self, *, key: bytes, **options: Any) -> None:
        super().__init__(**options)
        self._key = key
        self.quarantine = self.collection.database[SCHEDULER_QUARANTINE]

    def _sign(self, job_id: str, state: bytes) -> str:
        message = job_id.encode() + b"\0" + state
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def _document(self, job: ApsJob) -> dict[str, Any]:
        state = pickle.dumps(job.__getstate__(), self.pickle_protocol)
        return {"next_run_time": datetime_to_utc_timestamp(job.next_run_time),
                "job_state": Binary(state), "sig": self._sign(job.id, state)}

    def _restore(self, document: dict[str, Any]) -> ApsJob:
        """The job of a stored document; RejectedDocument unless we signed it."""
        state = document.get("job_state")
        sig = document.get("sig")
        if not isinstance(state, bytes):
            raise RejectedDocument("no job state")
        if not isinstance(sig, str):
            raise RejectedDocument("not signed (written by something other than this "
                                   "mwapjobs, or by a version before signing)")
        if not hmac.compare_digest(sig, self._sign(str(document["_id"]), bytes(state))):
            raise RejectedDocument("bad signature (changed outside mwapjobs, or signed "
                                   "with another key)")
        try:
            job_state = _TriggerUnpickler(io.BytesIO(state)).load()
        except Exception as exc:
            raise RejectedDocument(f"signed but not a trigger of ours ({exc})") from None
        if not isinstance(job_state, dict) or job_state.get("func") != FIRE_REF:
            raise RejectedDocument("signed but not a trigger of ours")
        job = ApsJob.__new__(ApsJob)
        job.__setstate__(job_state)
        job._scheduler = self._scheduler
        job._jobstore_alias = self._alias
        return job

    def _reject(self, document: dict[str, Any], reason: str) -> None:
        """Move a document we will not read aside, for an operator to look at."""
        job_id = document.get("_id")
        self.quarantine.insert_one({
            "jobId": str(job_id)[:500], "reason": reason, "quarantinedAt": datetime.now(UTC),
            # As BSON bytes: whatever it holds, it is stored, not interpreted.
            "document": Binary(bson.encode(document))})
        self.collection.delete_one({"_id": job_id})
        log.error("scheduler document rejected: it was never unpickled, and moved to "
                  f"{SCHEDULER_QUARANTINE}", extra={"jobId": str(job_id)[:200], "reason": reason})

    # -- APScheduler's job store interface ----------------------------------------------

    def lookup_job(self, job_id: str) -> ApsJob | None:
        self.round_trips += 1
        document = self.collection.find_one(job_id, ["job_state", "sig"])
        if document is None:
            return None
        try:
            return self._restore(document)
        except RejectedDocument as exc:
            self._reject(document, str(exc))
            return None

    def get_due_jobs(self, now: datetime) -> list[ApsJob]:
        return self._get_jobs({"next_run_time": {"$lte": datetime_to_utc_timestamp(now)}})

    def get_next_run_time(self) -> Any:
        self.round_trips += 1
        return super().get_next_run_time()

    def get_all_jobs(self) -> list[ApsJob]:
        jobs = self._get_jobs({})
        self._fix_paused_jobs_sorting(jobs)
        return jobs

    def add_job(self, job: ApsJob) -> None:
        self.round_trips += 1
        try:
            self.collection.insert_one({"_id": job.id, **self._document(job)})
        except DuplicateKeyError:
            raise ConflictingIdError(job.id) from None

    def update_job(self, job: ApsJob) -> None:
        self.round_trips += 1
        result = self.collection.update_one({"_id": job.id}, {"$set": self._document(job)})
        if result and result.matched_count == 0:
            raise JobLookupError(job.id)

    def update_job_if(self, job: ApsJob, next_run_time: datetime | None) -> bool:
        """`update_job`, only if the stored trigger still fires at `next_run_time` (as it
        was read): False when it was paused, resumed, replaced or moved meanwhile, and
        then it is left as it is. The clock moves triggers on with this, so a pause made
        on another instance during a fire is not undone."""
        self.round_trips += 1
        result = self.collection.update_one(
            {"_id": job.id, "next_run_time": datetime_to_utc_timestamp(next_run_time)},
            {"$set": self._document(job)})
        return bool(result and result.matched_count)

    def remove_job(self, job_id: str) -> None:
        self.round_trips += 1
        super().remove_job(job_id)

    def _get_jobs(self, conditions: dict[str, Any]) -> list[ApsJob]:
        self.round_trips += 1
        jobs = []
        for document in self.collection.find(conditions, ["_id", "job_state", "sig"],
                                              sort=[("next_run_time", ASCENDING)]):
            try:
                jobs.append(self._restore(document))
            except RejectedDocument as exc:
                self._reject(document, str(exc))
        return jobs

    def readable(self, documents: list[dict[str, Any]]) -> list[ApsJob]:
        """The jobs of `documents` (read through the door, `with_prefix`) that we signed;
        the others are left for the clock's next pass to quarantine."""
        jobs = []
        for document in documents:
            with contextlib.suppress(RejectedDocument):
                jobs.append(self._restore(document))
        return jobs


def _escape(text: str) -> str:
    return "".join("\\" + c if not c.isalnum() and c not in "-_:" else c for c in text)


async def with_prefix(mongo: Mongo, prefix: str) -> list[dict[str, Any]]:
    """The stored jobs whose id starts with `prefix`, via an anchored (indexed) `_id`
    match, through the database door: listing repeat schedules reads only those."""
    query = {"_id": {"$regex": "^" + _escape(prefix)}}
    docs: list[dict[str, Any]] = await mongo.call(lambda db: db[SCHEDULER_JOBS].find(
        query, ["_id", "job_state", "sig"], sort=[("next_run_time", ASCENDING)]
    ).to_list(None))
    return docs


async def quarantined(mongo: Mongo) -> tuple[int, datetime | None]:
    """How many scheduler documents are in the quarantine, and when the latest came."""
    count = await mongo.call(lambda db: db[SCHEDULER_QUARANTINE].count_documents({}))
    if not count:
        return 0, None
    doc = await mongo.call(lambda db: db[SCHEDULER_QUARANTINE].find_one(
        {}, {"quarantinedAt": 1}, sort=[("quarantinedAt", DESCENDING)]))
    when = doc.get("quarantinedAt") if doc else None
    if isinstance(when, datetime) and when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(count), when if isinstance(when, datetime) else None
