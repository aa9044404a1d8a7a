"""Typed application keys: one per resource a handler needs (aiohttp's `AppKey`), so a
handler names what it uses and never reaches into the daemon.

Jobs add their own keys next to their routes (for example `jobs/refresh/api.py`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from ..config import Settings
    from ..engine import Engine
    from ..metrics import DaemonMetrics
    from ..operations import Operations
    from .auth import Authenticator

SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
AUTH: web.AppKey[Authenticator] = web.AppKey("auth")
ENGINE: web.AppKey[Engine] = web.AppKey("engine")
OPERATIONS: web.AppKey[Operations] = web.AppKey("operations")
# Why the daemon is not ready to work (empty when it is): /readyz.
READINESS: web.AppKey[Callable[[], list[str]]] = web.AppKey("readiness")
# What jobs add to /readyz's data when ready (fields; the generic ones are never replaced).
READY_DETAILS: web.AppKey[list[Callable[[], dict[str, Any]]]] = web.AppKey("ready_details")
METRICS: web.AppKey[DaemonMetrics] = web.AppKey("metrics")
# OpenAPI path items the jobs' routes add to the document (api/openapi.py).
OPENAPI_PATHS: web.AppKey[dict[str, Any]] = web.AppKey("openapi_paths")
