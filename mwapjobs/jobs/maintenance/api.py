"""Upkeep over HTTP (admin token or superadmin):

- `GET /api/v1/maintenance/report`: the last upkeep run's whole report (flows reset,
  history archived and deleted, indexes, orphans, sizes), the schedule, and whether
  upkeep runs here;
- `POST /api/v1/maintenance/run` (audited): an upkeep run now (one at a time: a run
  already pending or running is returned instead).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ...api.envelope import ApiError, ok
from ...api.keys import AUTH, ENGINE
from ...api.openapi import operation
from ...config import MaintenanceSettings
from ...logs import audit
from ...storage.maintenance import MaintenanceStore
from .upkeep import JOB_ID, QUEUE, Upkeep

REPORT_PATH = "/api/v1/maintenance/report"
RUN_PATH = "/api/v1/maintenance/run"
OPENAPI = {
    REPORT_PATH: {"get": operation("The last upkeep report: flows, retention, indexes, "
                                   "orphans, sizes", errors=("503",))},
    RUN_PATH: {"post": operation("Run upkeep now", ok_status="202", errors=("503",))},
}


@dataclass(frozen=True)
class MaintenanceApi:
    upkeep: Upkeep | None  # None: upkeep is off on this daemon
    store: MaintenanceStore
    settings: MaintenanceSettings


MAINTENANCE_API: web.AppKey[MaintenanceApi] = web.AppKey("maintenance_api")


async def report(request: web.Request) -> web.Response:
    await request.app[AUTH].require_admin(request)
    api = request.app[MAINTENANCE_API]
    last: dict[str, Any] | None = await api.store.report()
    return ok({"enabled": api.upkeep is not None,
               "schedule": {"cron": api.settings.cron, "timezone": api.settings.timezone},
               "archiveDir": api.settings.archive_dir, "report": last})


async def run_now(request: web.Request) -> web.Response:
    caller = await request.app[AUTH].require_admin(request)
    api = request.app[MAINTENANCE_API]
    if api.upkeep is None:
        raise ApiError(503, "maintenance/disabled", "Upkeep is disabled on this daemon.")
    engine = request.app[ENGINE]
    if not engine.running:
        raise ApiError(503, "service/not-ready", "The job engine is not running yet.")
    added = await engine.add(QUEUE, {"trigger": "manual"}, job_id=JOB_ID)
    audit("maintenance.run", caller.actor, f"queue:{QUEUE}", runId=added.run_id,
          created=added.created)
    return ok({"runId": added.run_id, "state": added.state, "created": added.created},
              status=202)


def routes(api: MaintenanceApi) -> Callable[[web.Application], None]:
    def add(app: web.Application) -> None:
        app[MAINTENANCE_API] = api
        app.router.add_get(REPORT_PATH, report)
        app.router.add_post(RUN_PATH, run_now)
    return add
