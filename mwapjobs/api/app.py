"""The aiohttp application: middlewares, the generic routes, and the routes jobs add."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..config import Settings
from ..engine import Engine
from ..metrics import DaemonMetrics
from ..operations import Operations
from . import dashboard, health, metrics, openapi, queues
from .auth import Authenticator
from .envelope import envelope_middleware
from .keys import (
    AUTH,
    ENGINE,
    METRICS,
    OPENAPI_PATHS,
    OPERATIONS,
    READINESS,
    READY_DETAILS,
    SETTINGS,
)


@dataclass(frozen=True)
class Resources:
    """What the generic handlers use, one application key each (api/keys.py)."""

    settings: Settings
    auth: Authenticator
    engine: Engine
    operations: Operations
    readiness: Callable[[], list[str]]
    metrics: DaemonMetrics


def build_app(resources: Resources,
              routes: Sequence[Callable[[web.Application], None]] = (),
              openapi_paths: dict[str, Any] | None = None) -> web.Application:
    """`routes` add a job's handlers (and its own keys); `openapi_paths` document them."""
    app = web.Application(
        middlewares=[envelope_middleware, dashboard.session_middleware],
        client_max_size=resources.settings.http.max_body_bytes,
    )
    app[SETTINGS] = resources.settings
    app[AUTH] = resources.auth
    app[ENGINE] = resources.engine
    app[OPERATIONS] = resources.operations
    app[READINESS] = resources.readiness
    app[READY_DETAILS] = []
    app[METRICS] = resources.metrics
    app[OPENAPI_PATHS] = dict(openapi_paths or {})
    health.add_routes(app)
    queues.add_routes(app)
    dashboard.add_routes(app)
    openapi.add_routes(app)
    metrics.add_routes(app)
    for add in routes:
        add(app)
    return app
