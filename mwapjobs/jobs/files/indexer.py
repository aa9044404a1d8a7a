"""The `file-index` job: a sweep (adds one pass per indexable project), or one
project's pass, full or incremental (`decide.plan`).

A pass:
1. reads the project and its integration again (ids in either form) and stops, with
   the reason in the summary, unless the project is indexable now: not archived, its
   integration exists, is the same tenant's, is connected and is not `revoked` (a
   revoked integration is never touched: no provider request, no refresh);
2. takes one of the provider's pass slots (at most `files.provider_concurrency` passes of
   one provider at once here); when they are all taken the run is postponed at once
   (`Postpone`: no attempt used), so that the queue's slots go to other providers'
   projects instead of waiting: one slow provider never takes them all. The postponed
   run is parked: the next pass of that provider to end here makes it due at once (the
   oldest parked first), so a freed slot is not left idle until a delay runs out; the
   delay (`POSTPONE_FOR`) is only the fallback (another instance's run, a lost wake);
3. streams the provider's pages (`Feed`, one page ahead) into the writer, saving the
   cursor and the summary's counts after each page (one write): a restart, a timeout or
   a retry resumes from the last written page;
4. a full pass ends by removing what it did not see, counting the project's index
   exactly, and storing the cursor its last page gave; an incremental pass whose cursor
   expired (Dropbox `reset`, Graph 410, an unknown Drive page token) makes a full pass.

Errors: a `ProjectProblem` (folder missing or ambiguous, token refused after a refresh,
a refused URL) fails the run for good (`PermanentError`); a provider that keeps failing
or rate-limiting raises `TransientError`, which the engine retries with backoff (three
attempts), resuming from the saved cursor. Either way the summary says `error`, with
the reason and since when (`failingSince`, for the `file_sync_failing` alert), and the
other projects go on: each is its own run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import aiohttp

from ...config import FileIndexSettings, RefreshSettings
from ...crypto import MwapCipher
from ...engine import Engine, as_utc, postponed
from ...outbound import UrlPolicy
from ...queues import Job, PermanentError, Postpone, QueueRegistry, TransientError
from ...ratelimit import KeyedLimiter
from ...storage.files import FileIndexStore
from ...storage.integrations import IntegrationStore
from ...timeouts import within
from ..providers import provider_kind
from ..refresh.now import refresh_now
from .client import Connection, ProviderClient
from .decide import Outcome, folder_path, ineligible, plan
from .drive import DRIVE_API, DriveLister, Frontier
from .dropbox import DROPBOX_API, DropboxLister
from .feed import Feed
from .graph import GRAPH_API, GraphLister
from .metrics import FileMetrics
from .model import CursorExpired, Page, ProjectProblem
from .parse import text
from .schedule import QUEUE, IndexData, delay_for, job_id
from .writer import IndexWriter, Written, ms

log = logging.getLogger(__name__)

# A project that is not indexed (archived, revoked, ...) is not failing to sync either:
# its `file_sync_failing` condition ends (the last error stays, for the record).
NOT_FAILING = ("failingSince",)
PROVIDER_WAIT = 0.2  # seconds a pass waits for one of its provider's pass slots, holding
POSTPONE_FOR = 5.0  # a queue slot; then it is put back for 1 to 2 times this long, unless
# a slot frees before (`_wake`)


@dataclass
class PassReport:
    projectId: str
    mode: str
    resumed: bool = False
    why: str = ""
    cursorExpired: bool = False
    pages: int = 0
    requests: int = 0
    added: int = 0
    changed: int = 0
    removed: int = 0
    unchanged: int = 0
    conflicts: int = 0
    unresolved: int = 0
    invalid: int = 0
    files: int = 0
    folders: int = 0
    totalSize: int = 0
    seconds: float = 0.0

    def take(self, written: Written) -> None:
        for name in ("added", "changed", "removed", "unchanged", "conflicts", "unresolved",
                     "invalid"):
            setattr(self, name, getattr(self, name) + getattr(written, name))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Pass:
    """What one pass of one project works with."""

    project: dict[str, Any]
    project_id: str
    folder: str
    conn: Connection
    config: dict[str, Any]
    state: dict[str, Any]
    run_id: str | None
    report: PassReport
    started: float
    progress: dict[str, Any] = field(default_factory=dict)


class FileIndexer:
    def __init__(self, *, store: FileIndexStore, integrations: IntegrationStore,
                 cipher: MwapCipher, http: aiohttp.ClientSession, policy: UrlPolicy,
                 shared: KeyedLimiter | None, settings: FileIndexSettings,
                 refresh: RefreshSettings | None, engine: Engine,
                 clock: Callable[[], datetime], user_agent: str,
                 metrics: FileMetrics | None = None) -> None:
        """`refresh` is None when token refresh is off here: a 401 is then final."""
        self.store = store
        self.integrations = integrations
        self.cipher = cipher
        self.settings = settings
        self.refresh_settings = refresh
        self.engine = engine
        self.clock = clock
        self.metrics = metrics
        self.limiter = KeyedLimiter(settings.provider_concurrency, settings.provider_rate,
                                    within=shared)
        self.client = ProviderClient(http, policy, self.limiter, settings,
                                     refresh=self._refresh, on_call=self._on_call,
                                     user_agent=user_agent, clock=clock)
        self._passes: dict[str, asyncio.Semaphore] = {}  # provider id -> pass slots
        # provider id -> projects whose pass was postponed for want of a slot, oldest
        # first -> whether the postponement is written (only then can it be made due)
        self._parked: dict[str, dict[str, bool]] = {}
        self._wakes: set[asyncio.Task[None]] = set()
        self._acquiring: dict[str, int] = {}  # provider id -> passes waiting for a slot
        self.running: dict[str, dict[str, Any]] = {}  # projectId -> progress
        self.stopping = False

    def register(self, registry: QueueRegistry) -> None:
        registry.register(QUEUE, self, data=IndexData, attempts=3,
                          backoff={"delay": 30.0, "max_delay": 900.0},
                          concurrency=self.settings.concurrency,
                          timeout=self.settings.pass_timeout)

    def on_event(self, event: str, run: dict[str, Any]) -> None:
        """The engine wrote a postponement: a parked pass can be made due from now on,
        at once if a slot of its provider is free already."""
        if event != "postponed" or run.get("queue") != QUEUE:
            return
        pid = str((run.get("data") or {}).get("projectId") or "")
        for key, parked in self._parked.items():
            if pid in parked:
                parked[pid] = True
                if self._free(key):
                    self._wake(key)
                return

    def _park(self, key: str, pid: str) -> None:
        self._parked.setdefault(key, {}).setdefault(pid, False)

    def _wake(self, key: str) -> None:
        """A pass slot of this provider is free: make the oldest parked pass due now."""
        parked = self._parked.get(key) or {}
        pid = next((p for p, written in parked.items() if written), None)
        if pid is None or self.stopping:
            return
        del parked[pid]
        task = asyncio.create_task(self._promote(key, pid), name="mwapjobs:file-index-wake")
        self._wakes.add(task)
        task.add_done_callback(self._wakes.discard)

    async def _promote(self, key: str, pid: str) -> None:
        try:
            promoted = await self.engine.promote_matching(QUEUE, {"projectId": pid},
                                                          postponed_only=True)
        except Exception as exc:  # the fallback delay still brings it back
            log.info("could not make a parked file index pass due",
                     extra={"projectId": pid, "reason": f"{type(exc).__name__}: {exc}"[:200]})
            return
        if not promoted and self._free(key):
            self._wake(key)  # that one was taken meanwhile (or is gone): the next

    def _free(self, key: str) -> bool:
        """A pass slot of this provider is free and no pass here is about to take it."""
        gate = self._passes.get(key)
        return gate is not None and not gate.locked() and not self._acquiring.get(key)

    def interrupt(self) -> None:
        """The daemon is stopping: passes stop after the page they are writing (their
        cursor is saved), and resume at the next start."""
        self.stopping = True

    async def __call__(self, job: Job) -> dict[str, Any]:
        if job.data.get("sweep"):
            return await self.sweep(spread=bool(job.data.get("spread", True)))
        return await self.index(str(job.data["projectId"]), str(job.data.get("mode") or "auto"),
                                run_id=job.run_id)

    # -- the sweep ------------------------------------------------------------------

    async def sweep(self, *, spread: bool) -> dict[str, Any]:
        """Add a pass for every indexable project (spread over the interval); note why
        the others are not indexed; forget the index of projects gone or archived."""
        projects = await self.store.indexable_projects()
        integrations = await self.store.integrations(
            [p["cloudIntegrationId"] for p in projects])
        summaries = {str(s["_id"]): s for s in await self.store.summaries()}
        reasons: Counter[str] = Counter()
        scheduled, now = 0, self.clock()
        keep: set[str] = set()
        for project in sorted(projects, key=lambda p: str(p["_id"])):
            pid = str(project["_id"])
            keep.add(pid)
            reason = ineligible(project, integrations.get(str(project["cloudIntegrationId"])))
            if reason is not None:
                reasons[reason] += 1
                known = summaries.get(pid) or {}
                if known.get("state") != "skipped" or known.get("skipReason") != reason:
                    await self.store.save_state(pid, {
                        "state": "skipped", "skipReason": reason, "updatedAt": now,
                        "tenantId": str(project.get("tenantId"))}, unset=NOT_FAILING)
                continue
            added = await self.engine.add(
                QUEUE, {"projectId": pid, "mode": "auto", "trigger": "schedule"},
                job_id=job_id(pid),
                delay=delay_for(pid, self.settings.interval, spread))
            scheduled += int(added.created)
        dropped = 0
        for pid in sorted(set(summaries) - keep):
            removed = await self.store.drop_project(pid)
            dropped += 1
            log.info("file index of a project no longer indexed removed",
                     extra={"projectId": pid, "removed": removed})
        return {"projects": len(projects), "scheduled": scheduled,
                "skipped": dict(reasons), "dropped": dropped, "spread": spread}

    # -- one project's pass ---------------------------------------------------------------

    async def index(self, project_id: str, mode: str = "auto", *,
                    run_id: str | None = None) -> dict[str, Any]:
        started = asyncio.get_running_loop().time()
        project = await self.store.project(project_id)
        if project is None:
            return {"projectId": project_id, "skipped": "the project no longer exists"}
        pid = str(project["_id"])
        cid = project.get("cloudIntegrationId")
        integration = await self.store.integration(cid) if cid else None
        reason = ineligible(project, integration)
        if reason is not None:
            await self.store.save_state(pid, {"state": "skipped", "skipReason": reason,
                                              "updatedAt": self.clock(),
                                              "tenantId": str(project.get("tenantId"))},
                                  unset=NOT_FAILING)
            log.info("file index pass skipped", extra={"projectId": pid, "reason": reason})
            return {"projectId": pid, "skipped": reason}
        assert integration is not None
        state = await self.store.state(pid) or {}
        try:
            work = await self._prepare(project, pid, integration, state, run_id, started)
            gate = self._passes.setdefault(work.conn.key,
                                           asyncio.Semaphore(self.settings.provider_concurrency))
            key = work.conn.key
            self._acquiring[key] = self._acquiring.get(key, 0) + 1
            try:
                await within(gate.acquire(), PROVIDER_WAIT)
            except TimeoutError:
                self._park(key, pid)
                raise Postpone(f"{self.settings.provider_concurrency} passes of this provider "
                               "are running here", POSTPONE_FOR * (1 + random.random())) from None
            finally:
                self._acquiring[key] -= 1
            (self._parked.get(key) or {}).pop(pid, None)
            try:
                return await self._run(work, mode)
            finally:
                gate.release()
                if self._free(key):
                    self._wake(key)
        except ProjectProblem as problem:
            await self._failed(pid, project, state, problem.code, problem.message)
            raise PermanentError(problem.message) from None
        except TransientError as exc:
            await self._failed(pid, project, state, "provider/unavailable", str(exc))
            raise
        except Postpone:
            raise
        except Exception as exc:
            await self._failed(pid, project, state, "internal",
                               f"{type(exc).__name__}: {exc}"[:300])
            raise

    async def _prepare(self, project: dict[str, Any], pid: str, integration: dict[str, Any],
                       state: dict[str, Any], run_id: str | None, started: float) -> _Pass:
        folder = folder_path(project.get("folderpath"))
        assert folder is not None  # `ineligible` checked it
        provider_id = str(integration.get("providerId"))
        provider = await self.integrations.provider(provider_id)
        if provider is None:
            raise ProjectProblem("provider/not-found", f"provider {provider_id} not found")
        kind = provider_kind(provider)
        if kind == "generic":
            raise ProjectProblem("provider/unsupported",
                                 "file indexing knows Dropbox, Google Drive and Microsoft "
                                 "Graph; this provider is none of them (metadata.providerType)")
        token = self.cipher.decrypt_lenient(str(integration.get("accessToken") or ""))
        conn = Connection(integration, provider, kind, str(provider["_id"]), token,
                          _base(kind, provider))
        config = {"integrationId": str(integration["_id"]), "folderpath": folder, "kind": kind}
        report = PassReport(projectId=pid, mode="", files=int(state.get("fileCount") or 0),
                            folders=int(state.get("folderCount") or 0),
                            totalSize=int(state.get("totalSize") or 0))
        return _Pass(project, pid, folder, conn, config, state, run_id, report, started)

    async def _run(self, work: _Pass, mode: str) -> dict[str, Any]:
        expires = work.conn.integration.get("tokenExpiresAt")
        if isinstance(expires, datetime) and as_utc(expires) <= self.clock():
            await self._refresh(work.conn)  # a token known to be dead: not worth a 401
            work.conn.refreshed = True
        chosen = plan(mode, work.state.get("pass"), work.state.get("cursor"), work.config,
                      work.state.get("lastFullSync"), self.clock(), self.settings.full_interval)
        work.report.mode, work.report.resumed, work.report.why = (chosen.mode, chosen.resume,
                                                                  chosen.why)
        self.running[work.project_id] = work.progress
        try:
            try:
                await self._pass(work, chosen.mode, resume=chosen.resume)
            except CursorExpired as exc:
                log.info("file index cursor expired; making a full pass",
                         extra={"projectId": work.project_id, "reason": str(exc)})
                work.report.mode, work.report.cursorExpired = "full", True
                work.report.why = "the stored cursor expired"
                await self._pass(work, "full", resume=False)
        finally:
            self.running.pop(work.project_id, None)
        work.report.requests = work.conn.requests
        work.report.seconds = round(asyncio.get_running_loop().time() - work.started, 3)
        log.info("file index pass done", extra=work.report.as_dict())
        return work.report.as_dict()

    async def _pass(self, work: _Pass, mode: str, *, resume: bool) -> None:
        store, pid, conn = self.store, work.project_id, work.conn
        now = ms(self.clock())
        frontier = Frontier(store, pid)
        current = work.state.get("pass") if resume else None
        if current is None:
            current = {"mode": mode, "mark": now, "startedAt": now, "resume": None,
                       "done": False, "pages": 0, **work.config}
            if conn.kind == "google":
                await frontier.clear()  # left by a pass that never finished
        current["runId"] = work.run_id
        # Written with the first page (a pass that dies before has nothing to resume).
        opening = {"pass": current, "state": "running", "runningSince": now,
                   "tenantId": str(work.project.get("tenantId")),
                   "name": work.project.get("name"), "folderpath": work.folder,
                   "kind": conn.kind, "providerId": conn.key,
                   "integrationId": work.config["integrationId"]}
        work.state["pass"] = None  # a second pass of this run (after an expiry) starts anew
        full = mode == "full"
        writer = IndexWriter(
            store, project_id=pid, integration_id=work.config["integrationId"],
            provider_id=conn.key, full=full, mark=as_utc(current["mark"]), clock=self.clock,
            case_insensitive=conn.kind == "dropbox",
            expand=frontier if conn.kind == "google" and not full else None,
            fresh=full and current.get("pages", 0) == 0 and not work.report.files
            and not work.report.folders)
        cursor = work.state.get("cursor") or {}
        root = (cursor.get("value") or {}).get("rootId")
        if isinstance(root, str) and not full:
            writer.know_root(root, work.folder)
        last = current.get("resume")
        work.progress.update({"runId": work.run_id, "mode": mode, "startedAt": now, "pages": 0})
        tail: dict[str, int] = {}  # the last page's counts, written with the summary
        if not current.get("done"):
            last, tail = await self._stream(work, writer, frontier, full, current, opening,
                                            cursor.get("value"))
        counts: dict[str, Any] = {}
        if full and writer.fresh:
            # A first pass that found nothing of the project indexed: nothing to sweep,
            # and its counts are exactly what it inserted (no recount: on the embedded
            # store that is a scan of every document the pass just wrote).
            counts = {"fileCount": work.report.files, "folderCount": work.report.folders,
                      "totalSize": work.report.totalSize}
        elif full:
            swept = await writer.sweep()
            work.report.take(swept)
            self._count(swept)
            files, folders, size = await store.totals(pid)  # exact, whatever came before
            counts = {"fileCount": files, "folderCount": folders, "totalSize": size}
            work.report.files, work.report.folders, work.report.totalSize = files, folders, size
        if conn.kind == "google":
            await frontier.clear()
        done_at = self.clock()
        work.report.requests = conn.requests
        summary = {"state": "synced", "lastSync": done_at, **counts,
                   "cursor": {**work.config, "value": last},
                   "lastRun": {k: v for k, v in work.report.as_dict().items()
                               if k not in ("files", "folders", "totalSize", "seconds")}
                   | {"runId": work.run_id, "at": done_at}}
        if full:
            summary["lastFullSync"] = done_at
        await store.save_state(pid, summary, inc=None if full else tail,
                               unset=("pass", "lastError", "failingSince", "skipReason",
                                      "runningSince"))
        if self.settings.write_project_metadata:
            await store.write_project_metadata(work.project, work.report.files,
                                               work.report.totalSize, done_at)

    async def _stream(self, work: _Pass, writer: IndexWriter, frontier: Frontier, full: bool,
                      current: dict[str, Any], opening: dict[str, Any] | None, cursor: Any
                      ) -> tuple[dict[str, Any] | None, dict[str, int]]:
        """Every page of the listing into the index, the pass state saved after each but
        the last (whose counts the summary's write carries); returns the last page's
        `resume` and those counts."""
        conn, size, resume = work.conn, self.settings.page_size, current.get("resume")
        lister: DropboxLister | DriveLister | GraphLister

        def pages(barrier: Callable[[], Awaitable[None]]) -> AsyncIterator[Page]:
            nonlocal lister
            if conn.kind == "dropbox":
                lister = DropboxLister(self.client, conn, work.folder, size)
            elif conn.kind == "google":
                lister = DriveLister(self.client, conn, work.folder, size, frontier, barrier)
            else:
                lister = GraphLister(self.client, conn, work.folder, size)
            if full:
                return lister.full(resume)
            if not isinstance(cursor, dict):
                raise CursorExpired("no stored cursor")
            return lister.changes(cursor, resume)

        last, tail = resume, {}
        async with Feed(pages) as feed:
            while (page := await feed.next()) is not None:
                if self.stopping:
                    await feed.close()  # first: the fetch ahead must not go on meanwhile
                    await self.store.save_state(work.project_id, {"state": "interrupted"})
                    raise Postpone("the daemon is stopping; the pass resumes from its last "
                                   "written page", 0.0)
                written = await writer.apply(page)
                work.report.take(written)
                work.report.pages += 1
                work.report.files += written.files
                work.report.folders += written.folders
                work.report.totalSize += written.size
                work.progress["pages"] = work.report.pages
                self._count(written)
                last = page.resume
                inc = {"fileCount": written.files, "folderCount": written.folders,
                       "totalSize": written.size}
                if page.done:
                    tail = inc
                    feed.written()
                    continue
                fields: dict[str, Any] = {"pass.resume": page.resume, "pass.runId": work.run_id}
                if opening is not None:  # the pass's first write: all of it
                    fields = {**opening, "pass": {**current, "resume": page.resume,
                                                  "pages": int(current.get("pages") or 0) + 1}}
                    opening = None
                else:
                    inc["pass.pages"] = 1
                await self.store.save_state(work.project_id, fields, inc=inc)
                feed.written()
        return last, tail

    def _count(self, written: Written) -> None:
        if self.metrics is not None:
            self.metrics.indexed(written.added, written.changed, written.removed)

    def _on_call(self, kind: str, outcome: Outcome) -> None:
        if self.metrics is not None:
            self.metrics.call(kind, outcome)

    async def _failed(self, pid: str, project: dict[str, Any], state: dict[str, Any],
                      code: str, message: str) -> None:
        now = self.clock()
        fields: dict[str, Any] = {"state": "error", "updatedAt": now,
                                  "lastError": {"code": code, "message": message[:300], "at": now},
                                  "tenantId": str(project.get("tenantId"))}
        if state.get("failingSince") is None:
            fields["failingSince"] = now
        log.warning("file index pass failed", extra={"projectId": pid, "code": code,
                                                     "reason": message[:300]})
        with contextlib.suppress(Exception):  # the error is the run's, whatever this does
            await self.store.save_state(pid, fields, unset=("runningSince",))

    # -- a refused access token ----------------------------------------------------------

    async def _refresh(self, conn: Connection) -> None:
        """The one "refresh now and wait" path (jobs/refresh/now.py), then the new token.
        Raises when a refresh cannot help, so the request is not sent again."""
        doc = conn.integration
        if self.refresh_settings is None:
            raise ProjectProblem("auth/refresh-off", "the provider refused the access token "
                                 "and token refresh is disabled on this daemon")
        if not doc.get("refreshToken"):
            raise ProjectProblem("auth/reconnect", "the provider refused the access token and "
                                 "there is no refresh token: the tenant must reconnect")
        added = await refresh_now(self.engine, doc, self.clock())
        run = await added.settled(self.refresh_settings.wait_timeout) or {}
        fresh = await self.store.integration(doc["_id"])
        if fresh is None or fresh.get("status") == "revoked" or not fresh.get("accessToken"):
            raise ProjectProblem("integration/not-connected",
                                 "the integration was revoked or disconnected meanwhile")
        if fresh.get("accessToken") == doc.get("accessToken"):
            error = run.get("error") or {}
            if postponed(run):
                raise TransientError("the token refresh waits for its provider's hold",
                                     retry_after=60.0)
            if run.get("state") == "failed" and error.get("permanent"):
                raise ProjectProblem("auth/refresh-refused",
                                     f"the token refresh was refused: {error.get('message')}")
            raise TransientError(f"the token refresh did not succeed ({run.get('state')})")
        conn.integration = fresh
        conn.token = self.cipher.decrypt_lenient(str(fresh.get("accessToken") or ""))


def _base(kind: str, provider: dict[str, Any]) -> str:
    """The file API's base URL: `metadata.filesApiBaseUrl`, (Dropbox) `apiBaseUrl` as
    MWAP uses it, else the provider's public API. The outbound policy checks every URL."""
    metadata = provider.get("metadata") or {}
    own = text(metadata.get("filesApiBaseUrl"), 2048) if isinstance(metadata, dict) else None
    if kind == "dropbox":
        base = own or (text(metadata.get("apiBaseUrl"), 2048)
                       if isinstance(metadata, dict) else None) or DROPBOX_API
    elif kind == "google":
        base = own or DRIVE_API
    else:
        base = own or GRAPH_API
    return base.rstrip("/")
