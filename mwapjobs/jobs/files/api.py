"""File indexing over HTTP.

- `POST /api/v1/tenants/{tenantId}/projects/{projectId}/index` (the tenant's owner, a
  superadmin or an admin token; audited as `project.index`): a pass now, first in line.
  Body (optional): `{"full": true}` for a full pass. One pass at a time per project: a
  pending one is moved to now (202), a running one answers 409 with its run id.
- `GET` of the same path: the project's index summary (counts, last sync, state, last
  error, the last pass's result, the pass running now) and why it is not indexed, if
  it is not.
- `GET /api/v1/files/index` (admin token or superadmin): every project's summary,
  failing ones first, with counts by state (the dashboard's panel).
A project unknown, or of another tenant, is a 404; bad input a 400; never a 500.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiohttp import web

from ...api.auth import Caller
from ...api.envelope import ApiError, json_body, ok
from ...api.keys import AUTH, ENGINE
from ...api.openapi import PAGING, TENANT_ID, operation
from ...api.validation import path_id, query_int
from ...config import FileIndexSettings
from ...logs import audit
from ...storage.files import FileIndexStore
from .decide import ineligible
from .indexer import FileIndexer
from .schedule import MANUAL_PRIORITY, QUEUE, job_id

PROJECT_PATH = "/api/v1/tenants/{tenantId}/projects/{projectId}/index"
ALL_PATH = "/api/v1/files/index"
MAX_PAGE_SIZE = 200
PROJECT_ID = {"name": "projectId", "in": "path", "required": True,
              "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}}
OPENAPI = {
    PROJECT_PATH: {
        "post": operation("Index a project's files now (one pass at a time per project)",
                          params=[TENANT_ID, PROJECT_ID], ok_status="202",
                          body={"type": "object", "properties": {"full": {"type": "boolean"}}},
                          errors=("404", "409", "503")),
        "get": operation("A project's file index: counts, last sync, state, last error",
                         params=[TENANT_ID, PROJECT_ID], errors=("404", "503")),
    },
    ALL_PATH: {"get": operation("Every project's file index summary, failing ones first",
                                params=PAGING, errors=("503",))},
}
STATES = ("synced", "running", "error", "skipped", "interrupted")
_RANK = {"error": 0, "interrupted": 1, "running": 2, "skipped": 3, "synced": 4}


@dataclass(frozen=True)
class FilesApi:
    """What the endpoints need; `indexer` is None when file indexing is off here."""

    indexer: FileIndexer | None
    store: FileIndexStore
    settings: FileIndexSettings


FILES_API: web.AppKey[FilesApi] = web.AppKey("files_api")


def summary_view(pid: str, doc: dict[str, Any] | None) -> dict[str, Any]:
    """A project's summary as the API shows it, field by field (never the cursor)."""
    doc = doc or {}
    error = doc.get("lastError") if isinstance(doc.get("lastError"), dict) else None
    last = doc.get("lastRun") if isinstance(doc.get("lastRun"), dict) else None
    return {
        "projectId": pid,
        "tenantId": doc.get("tenantId"),
        "name": doc.get("name"),
        "integrationId": doc.get("integrationId"),
        "providerId": doc.get("providerId"),
        "provider": doc.get("kind"),
        "folderpath": doc.get("folderpath"),
        "state": doc.get("state") or "never",
        "skipReason": doc.get("skipReason"),
        "fileCount": int(doc.get("fileCount") or 0),
        "folderCount": int(doc.get("folderCount") or 0),
        "totalSize": int(doc.get("totalSize") or 0),
        "lastSync": doc.get("lastSync"),
        "lastFullSync": doc.get("lastFullSync"),
        "failingSince": doc.get("failingSince"),
        "lastError": {"code": error.get("code"), "message": error.get("message"),
                      "at": error.get("at")} if error else None,
        "lastRun": {k: last.get(k) for k in (
            "runId", "at", "mode", "resumed", "cursorExpired", "pages", "requests", "added",
            "changed", "removed", "unchanged", "conflicts")} if last else None,
    }


async def _project(request: web.Request) -> tuple[str, dict[str, Any], Caller]:
    tenant_id = path_id(request, "tenantId")
    project_id = path_id(request, "projectId")
    caller = await request.app[AUTH].require_tenant_access(request, tenant_id)
    project = await request.app[FILES_API].store.project(project_id)
    if project is None or str(project.get("tenantId")) != tenant_id:
        raise ApiError(404, "project/not-found", "No such project for this tenant.")
    return tenant_id, project, caller


async def index_now(request: web.Request) -> web.Response:
    tenant_id, project, caller = await _project(request)
    body = await json_body(request)
    full = body.get("full", False)
    if not isinstance(full, bool) or set(body) - {"full"}:
        raise ApiError(400, "validation/invalid-body",
                       "The body may only hold \"full\": true or false.")
    api = request.app[FILES_API]
    if api.indexer is None:
        raise ApiError(503, "files/disabled", "File indexing is disabled on this daemon.")
    engine = request.app[ENGINE]
    if not engine.running:
        raise ApiError(503, "service/not-ready", "The job engine is not running yet.")
    pid = str(project["_id"])
    integration = await api.store.integration(project["cloudIntegrationId"]) \
        if project.get("cloudIntegrationId") else None
    reason = ineligible(project, integration)
    if reason is not None:
        raise ApiError(409, "files/not-indexable", f"This project is not indexed: {reason}.")
    added = await engine.add(QUEUE, {"projectId": pid, "mode": "full" if full else "auto",
                                     "trigger": "manual", "requestedBy": caller.actor},
                             job_id=job_id(pid), replace=True, priority=MANUAL_PRIORITY)
    audit("project.index", caller.actor, f"project:{pid}", tenantId=tenant_id,
          runId=added.run_id, created=added.created, full=full)
    if added.state == "active":
        raise ApiError(409, "files/index-running",
                       f"A pass of this project is running (run {added.run_id}); "
                       "one pass at a time.")
    return ok({"runId": added.run_id, "state": added.state, "created": added.created,
               "mode": "full" if full else "auto"}, status=202)


async def project_index(request: web.Request) -> web.Response:
    _tenant, project, _caller = await _project(request)
    api = request.app[FILES_API]
    pid = str(project["_id"])
    integration = await api.store.integration(project["cloudIntegrationId"]) \
        if project.get("cloudIntegrationId") else None
    view = summary_view(pid, await api.store.state(pid))
    view["indexable"] = ineligible(project, integration) is None
    view["notIndexedBecause"] = ineligible(project, integration)
    view["running"] = api.indexer.running.get(pid) if api.indexer else None
    view["enabled"] = api.indexer is not None
    return ok(view)


async def all_indexes(request: web.Request) -> web.Response:
    await request.app[AUTH].require_admin(request)
    page = query_int(request, "page", 1, 1, 1_000_000)
    size = query_int(request, "pageSize", 50, 1, MAX_PAGE_SIZE)
    api = request.app[FILES_API]
    rows = [summary_view(str(d["_id"]), d) for d in await api.store.summaries()]
    rows.sort(key=lambda r: (_RANK.get(r["state"], 5), _stamp(r["failingSince"]),
                             r["projectId"]))
    states = Counter(r["state"] for r in rows)
    return ok({
        "enabled": api.indexer is not None,
        "interval": api.settings.interval, "fullInterval": api.settings.full_interval,
        "total": len(rows),
        "byState": {**{s: states.get(s, 0) for s in STATES},
                    **{s: n for s, n in states.items() if s not in STATES}},
        "files": sum(r["fileCount"] for r in rows),
        "totalSize": sum(r["totalSize"] for r in rows),
        "running": len(api.indexer.running) if api.indexer else 0,
        "items": rows[(page - 1) * size: page * size],
        "page": page, "pageSize": size,
    })


def _stamp(value: Any) -> float:
    return value.timestamp() if isinstance(value, datetime) else 0.0


def routes(api: FilesApi) -> Callable[[web.Application], None]:
    def add(app: web.Application) -> None:
        app[FILES_API] = api
        app.router.add_post(PROJECT_PATH, index_now)
        app.router.add_get(PROJECT_PATH, project_index)
        app.router.add_get(ALL_PATH, all_indexes)
    return add
