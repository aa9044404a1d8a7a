"""Liveness and readiness, for systemd, load balancers and operators."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .envelope import error, ok
from .keys import ENGINE, READINESS, READY_DETAILS


async def healthz(request: web.Request) -> web.Response:
    """The process is alive and its event loop answers. Says nothing about MongoDB."""
    return ok({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    """Ready to do work: MongoDB reachable and the scheduler running; 503 with reasons.
    The data says which instance this is, whether it leads, and what jobs add (token
    refresh: how discovery follows the backend's writes)."""
    reasons = request.app[READINESS]()
    if reasons:
        response = error(503, "service/not-ready", "; ".join(reasons))
        return response
    engine = request.app[ENGINE]
    data: dict[str, Any] = {"status": "ready", "instance": engine.owner,
                            "leader": engine.leadership.leading}
    for detail in request.app[READY_DETAILS]:
        for key, value in detail().items():
            data.setdefault(key, value)
    return ok(data)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
