"""Liveness and readiness, for systemd, load balancers and operators."""

from __future__ import annotations

from aiohttp import web

from .envelope import error, ok
from .keys import ENGINE, READINESS


async def healthz(request: web.Request) -> web.Response:
    """The process is alive and its event loop answers. Says nothing about MongoDB."""
    return ok({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    """Ready to do work: MongoDB reachable and the scheduler running; 503 with reasons."""
    reasons = request.app[READINESS]()
    if reasons:
        response = error(503, "service/not-ready", "; ".join(reasons))
        return response
    engine = request.app[ENGINE]
    return ok({"status": "ready", "instance": engine.owner,
               "leader": engine.leadership.leading})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
