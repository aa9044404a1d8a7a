"""The aiohttp application: middlewares and routes, nothing else."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from . import dashboard, health, health_api, metrics, openapi, queues, refresh
from .envelope import envelope_middleware
from .keys import DAEMON

if TYPE_CHECKING:
    from ..daemon import Daemon


def build_app(daemon: Daemon) -> web.Application:
    app = web.Application(
        middlewares=[envelope_middleware, dashboard.session_middleware],
        client_max_size=daemon.settings.http.max_body_bytes,
    )
    app[DAEMON] = daemon
    health.add_routes(app)
    refresh.add_routes(app)
    health_api.add_routes(app)
    queues.add_routes(app)
    dashboard.add_routes(app)
    openapi.add_routes(app)
    metrics.add_routes(app)
    return app
