"""The OpenAPI 3 document served at /api/v1/openapi.json.

Written by hand, next to the routes it describes; a test checks that every
route the app serves is documented here and that nothing documented is
missing from the app.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .keys import OPENAPI_PATHS

STATES = ["delayed", "waiting", "active", "completed", "failed"]


def _envelope(data: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": ["success", "data"],
            "properties": {"success": {"type": "boolean", "enum": [True]}, "data": data}}


ERROR = {
    "type": "object", "required": ["success", "error"],
    "properties": {
        "success": {"type": "boolean", "enum": [False]},
        "error": {"type": "object", "required": ["code", "message"],
                  "properties": {"code": {"type": "string"}, "message": {"type": "string"}}},
    },
}
ANY = {"type": "object"}
PAGING = [
    {"name": "page", "in": "query", "schema": {"type": "integer", "minimum": 1}},
    {"name": "pageSize", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                    "maximum": 200}},
]
RUN_ID = {"name": "runId", "in": "path", "required": True,
          "schema": {"type": "string", "pattern": "^[0-9a-f]{24}$"}}
QUEUE = {"name": "queue", "in": "path", "required": True, "schema": {"type": "string"}}
ID = {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}
# Path parameters the jobs' routes share.
TENANT_ID = {"name": "tenantId", "in": "path", "required": True, "schema": ID}
INTEGRATION_ID = {"name": "integrationId", "in": "path", "required": True, "schema": ID}
TIME = {"type": "string", "nullable": True,
        "description": "ISO 8601, e.g. 2026-12-01T10:00:00+00:00"}
# A run as `operations.run_view` shows it; its id is `runId`, as in every other answer.
RUN = {
    "type": "object", "required": ["runId", "queue", "state", "data", "attempts"],
    "properties": {
        "runId": {"type": "string", "pattern": "^[0-9a-f]{24}$"},
        "queue": {"type": "string"},
        "jobId": {"type": "string", "nullable": True},
        "state": {"type": "string", "enum": STATES},
        "data": {"type": "object", "description": "secret-looking fields are [redacted]"},
        "priority": {"type": "integer"},
        "runAt": TIME,
        "createdAt": TIME,
        "startedAt": TIME,
        "finishedAt": TIME,
        "durationMs": {"type": "number", "nullable": True},
        "attemptsMade": {"type": "integer"},
        "maxAttempts": {"type": "integer", "nullable": True},
        "deadline": TIME,
        "stalledCount": {"type": "integer"},
        "result": {"nullable": True},
        "error": {"type": "object", "nullable": True},
        "attempts": {"type": "array", "items": {"type": "object"}},
    },
}


REPEAT_ID = {"name": "jobId", "in": "path", "required": True,
             "schema": {"type": "string", "minLength": 1, "maxLength": 200}}
REPEAT = {
    "type": "object", "required": ["queue", "jobId", "schedule", "paused"],
    "properties": {
        "queue": {"type": "string"}, "jobId": {"type": "string"},
        "schedule": {"type": "string"}, "timezone": {"type": "string"},
        "nextRunAt": TIME, "paused": {"type": "boolean"},
        "lastRun": {"type": "object", "nullable": True, "properties": {
            "runId": {"type": "string"}, "state": {"type": "string"}, "createdAt": TIME,
            "finishedAt": TIME, "fired": {"type": "boolean"}}},
        "data": {"type": "object"},
    },
}


def _page(summary: str, *, form: bool = False, params: list[dict[str, Any]] | None = None,
          content_types: tuple[str, ...] = ("text/html",)) -> dict[str, Any]:
    """A dashboard page or file (HTML, or a redirect), not the JSON envelope."""
    op: dict[str, Any] = {
        "summary": summary, "security": [], "parameters": params or [],
        "responses": {"200": {"description": "The page or file", "content": {
            ct: {"schema": {"type": "string"}} for ct in content_types}},
                      "303": {"description": "Redirect"},
                      "404": {"$ref": "#/components/responses/Error"}},
    }
    if form:
        op["requestBody"] = {"content": {"application/x-www-form-urlencoded": {"schema": {
            "type": "object", "properties": {"token": {"type": "string"}}}}}}
        op["responses"].update({s: {"description": "The login page with a message",
                                    "content": {"text/html": {"schema": {"type": "string"}}}}
                                for s in ("400", "401", "403", "429")})
    return op


def operation(summary: str, data: dict[str, Any] = ANY, *, auth: bool = True,
              params: list[dict[str, Any]] | None = None, body: dict[str, Any] | None = None,
              ok_status: str = "200", errors: tuple[str, ...] = (),
              security: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One operation answering in MWAP's envelope (jobs describe their routes with it)."""
    responses: dict[str, Any] = {
        ok_status: {"description": "OK", "content": {"application/json": {
            "schema": _envelope(data)}}},
    }
    for status in ("400", *(("401", "403") if auth else ()), *errors):
        responses[status] = {"$ref": "#/components/responses/Error"}
    op: dict[str, Any] = {"summary": summary, "responses": responses,
                          "parameters": params or []}
    op["security"] = security if security is not None else ([{"bearer": []}] if auth else [])
    if body is not None:
        op["requestBody"] = {"required": False, "content": {"application/json": {
            "schema": body}}}
    return op


def _with_existing(op: dict[str, Any]) -> dict[str, Any]:
    """Adding a job whose `jobId` has a pending run adds nothing: 200 with that run."""
    op["responses"]["200"] = {
        "description": "A run with this jobId is pending: nothing added (created: false)",
        "content": {"application/json": {"schema": _envelope(ANY)}}}
    return op


def document(job_paths: dict[str, Any] | None = None) -> dict[str, Any]:
    """The document: the generic routes, and `job_paths` (what the jobs' routes add)."""
    counts = {"type": "object", "properties": {
        s: {"type": "integer"} for s in ["waiting", "active", "delayed", "completed",
                                         "failed", "paused"]}}
    run_state = {"name": "state", "in": "query", "schema": {"type": "string",
                                                           "enum": [*STATES, "all"]},
                 "description": "default: failed, or all with a search; all needs a search"}
    search = [
        {"name": "jobId", "in": "query", "schema": {"type": "string", "maxLength": 201},
         "description": "exact job id, or a prefix ending in * (index mwapjobs_job)"},
        {"name": "field", "in": "query", "schema": {"type": "string",
                                                    "pattern": "^[A-Za-z][A-Za-z0-9_]{0,63}$"},
         "description": "a data field listed in engine.search_fields (e.g. integrationId)"},
        {"name": "value", "in": "query", "schema": {"type": "string", "maxLength": 200},
         "description": "the field's value (digits also match the number)"},
    ]
    run_page = {"type": "object", "properties": {"items": {"type": "array", "items": RUN},
                                                 "page": {"type": "integer"},
                                                 "pageSize": {"type": "integer"},
                                                 "total": {"type": "integer"}}}
    paging = PAGING
    paths: dict[str, Any] = {
        "/healthz": {"get": operation("The process is alive", auth=False)},
        "/readyz": {"get": operation(
            "MongoDB reachable and scheduler running (503 otherwise)", auth=False,
            errors=("503",))},
        "/metrics": {"get": {
            "summary": "Prometheus metrics (text format); access per metrics.access",
            "security": [{"bearer": []}, {}],
            "responses": {"200": {"description": "Prometheus text exposition",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}},
                          "401": {"$ref": "#/components/responses/Error"},
                          "403": {"$ref": "#/components/responses/Error"}}}},
        "/admin": {"get": _page("Redirects to the dashboard")},
        "/admin/queues": {"get": _page("The dashboard (redirects to the login page without a "
                                       "session)")},
        "/admin/login": {
            "get": _page("The login form"),
            "post": _page("Log in with an admin token or JWT (form field `token`); sets the "
                          "HttpOnly, SameSite=Strict session cookie", form=True),
        },
        "/admin/logout": {"post": operation("End the dashboard session, if any (with a session, "
                                      "needs X-CSRF-Token)", auth=False)},
        "/admin/session": {"get": operation("The session's actor, CSRF token and queue names",
                                      security=[{"session": []}])},
        "/admin/static/{name}": {"get": _page(
            "The dashboard's script and style sheet",
            params=[{"name": "name", "in": "path", "required": True,
                     "schema": {"type": "string", "enum": ["app.js", "style.css"]}}],
            content_types=("text/javascript", "application/javascript", "text/css"))},
        "/api/v1/openapi.json": {"get": {"summary": "This document", "security": [],
                                         "responses": {"200": {"description": "OK"}}}},
        "/api/v1/queues/stats": {"get": operation(
            "Counts by state for every queue (token-refresh → tokenRefresh)",
            {"type": "object", "additionalProperties": counts}, errors=("503",))},
        "/api/v1/queues/repeats": {"get": operation(
            "Repeat schedules with their next fire time (null: paused) and last run",
            {"type": "array", "items": REPEAT},
            params=[{"name": "queue", "in": "query", "schema": {"type": "string"}}],
            errors=("404", "503"))},
        "/api/v1/queues/runs/{runId}": {
            "get": operation("One run: data (secrets redacted), attempts, errors, timings", RUN,
                       params=[RUN_ID], errors=("404", "503")),
            "delete": operation("Remove a run that is not running (answers the removed run)", RUN,
                          params=[RUN_ID], errors=("404", "409", "503")),
        },
        "/api/v1/queues/runs/{runId}/retry": {"post": operation(
            "Retry a failed run now, with a fresh set of attempts", RUN, params=[RUN_ID],
            errors=("404", "409", "503"))},
        "/api/v1/queues/runs/{runId}/promote": {"post": operation(
            "Run a delayed run now", RUN, params=[RUN_ID], errors=("404", "409", "503"))},
        "/api/v1/queues/{queue}/runs": {"get": operation(
            "Runs of a queue in one state, or found by job id or data field, paginated",
            run_page, params=[QUEUE, run_state, *search, *paging], errors=("404", "503"))},
        "/api/v1/queues/runs": {"get": operation(
            "Find runs of every queue (or `queue`) by job id or data field, newest first",
            run_page, params=[{"name": "queue", "in": "query", "schema": {"type": "string"}},
                              run_state, *search, *paging], errors=("404", "503"))},
        "/api/v1/queues/repeats/{queue}/{jobId}/run": {"post": operation(
            "Run a repeat now, with its data and job id (its next fire stays); a pending run "
            "of that job id is the answer, with created false",
            {"type": "object", "properties": {"runId": {"type": "string"},
                                              "state": {"type": "string"},
                                              "created": {"type": "boolean"}}},
            params=[QUEUE, REPEAT_ID], ok_status="202", errors=("404", "503"))},
        "/api/v1/queues/repeats/{queue}/{jobId}/pause": {"post": operation(
            "Pause one repeat (no next fire) on every instance; it stays paused across "
            "restarts", REPEAT, params=[QUEUE, REPEAT_ID], errors=("404", "503"))},
        "/api/v1/queues/repeats/{queue}/{jobId}/resume": {"post": operation(
            "Resume a paused repeat: its next fire from now", REPEAT,
            params=[QUEUE, REPEAT_ID], errors=("404", "503"))},
        "/api/v1/queues/throughput": {"get": operation(
            "Runs completed and failed per minute per queue, oldest minute first (the last "
            "`minutes`, at most a day; a zero where none finished)",
            {"type": "object", "properties": {
                "from": TIME, "to": TIME, "minutes": {"type": "integer"},
                "stepSeconds": {"type": "integer"},
                "queues": {"type": "object", "additionalProperties": {
                    "type": "object", "properties": {
                        "completed": {"type": "array", "items": {"type": "integer"}},
                        "failed": {"type": "array", "items": {"type": "integer"}},
                        "total": {"type": "object"}}}}}},
            params=[{"name": "queue", "in": "query", "schema": {"type": "string"}},
                    {"name": "minutes", "in": "query",
                     "schema": {"type": "integer", "minimum": 1, "maximum": 1440}}],
            errors=("404", "503"))},
        "/api/v1/queues/{queue}/retry-failed": {"post": operation(
            "Retry every failed run (of errorType): dryRun counts them and answers asOf; "
            "the action with that asOf leaves runs that failed after the count",
            {"type": "object", "properties": {
                "count": {"type": "integer"}, "asOf": TIME,
                "byErrorType": {"type": "object", "additionalProperties": {"type": "integer"}},
                "retried": {"type": "integer"}, "skipped": {"type": "integer"},
                "more": {"type": "boolean"}}},
            params=[QUEUE], errors=("404", "415", "503"),
            body={"type": "object", "additionalProperties": False, "properties": {
                "dryRun": {"type": "boolean"}, "errorType": {"type": "string"},
                "asOf": {"type": "string"}}})},
        "/api/v1/queues/{queue}/promote-delayed": {"post": operation(
            "Run every delayed run now: dryRun counts them and answers asOf",
            {"type": "object", "properties": {
                "count": {"type": "integer"}, "asOf": TIME, "promoted": {"type": "integer"},
                "more": {"type": "boolean"}}},
            params=[QUEUE], errors=("404", "415", "503"),
            body={"type": "object", "additionalProperties": False, "properties": {
                "dryRun": {"type": "boolean"}, "asOf": {"type": "string"}}})},
        "/api/v1/queues/{queue}/jobs": {"post": _with_existing(operation(
            "Add a job by hand", params=[QUEUE], ok_status="201", errors=("404", "503"),
            body={"type": "object", "additionalProperties": False, "properties": {
                "data": {"type": "object"}, "jobId": {"type": "string"},
                "delay": {"type": "number", "minimum": 0},
                "priority": {"type": "integer"}, "attempts": {"type": "integer"}}}))},
        "/api/v1/queues/{queue}/clean": {"post": operation(
            "Delete finished runs older than olderThan seconds",
            {"type": "object", "properties": {"deleted": {"type": "integer"}}},
            params=[QUEUE], errors=("404", "503"),
            body={"type": "object", "properties": {
                "state": {"type": "string", "enum": ["completed", "failed"]},
                "olderThan": {"type": "number", "minimum": 0}}})},
        "/api/v1/queues/{queue}/pause": {"post": operation("Pause a queue", params=[QUEUE],
                                                     errors=("404", "503"))},
        "/api/v1/queues/{queue}/resume": {"post": operation("Resume a queue", params=[QUEUE],
                                                      errors=("404", "503"))},
    }
    return {
        "openapi": "3.0.3",
        "info": {"title": "mwapjobs", "version": "1",
                 "description": "Admin API of the MWAP background-job daemon. Every response "
                                "uses MWAP's envelope."},
        "paths": {**paths, **(job_paths or {})},
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "An admin token, or an Auth0 JWT"},
                "session": {"type": "apiKey", "in": "cookie", "name": "mwapjobs_session",
                            "description": "The dashboard session (state changes also need "
                                           "the X-CSRF-Token header)"},
            },
            "responses": {"Error": {"description": "Error",
                                    "content": {"application/json": {"schema": ERROR}}}},
        },
    }


async def openapi_json(request: web.Request) -> web.Response:
    """The raw document (no envelope), as OpenAPI tools expect it."""
    return web.json_response(document(request.app[OPENAPI_PATHS]))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/openapi.json", openapi_json)
