"""An admin token for in-process daemons, and a one-call JSON client for their API.

    settings = make_settings(**with_admin(maintenance={...}))
    status, body = await call(daemon, "GET", "/api/v1/maintenance/report")
"""

from __future__ import annotations

import hashlib
from typing import Any

import aiohttp

from mwapjobs.daemon import Daemon

ADMIN_TOKEN = "mwj_jobs-test-admin-token-0123456789abcdef"


def with_admin(**overrides: Any) -> dict[str, Any]:
    """Settings overrides with the test admin token configured."""
    digest = hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()
    return {"admin": {"tokens": [{"name": "ops", "sha256": digest}]}, **overrides}


async def call(daemon: Daemon, method: str, path: str, *, token: str | None = ADMIN_TOKEN,
               json: Any = None) -> tuple[int, Any]:
    """One request to the daemon's HTTP port: (status, decoded JSON body or text)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http, http.request(
            method, f"http://127.0.0.1:{daemon.port}{path}", headers=headers,
            json=json) as response:
        try:
            body: Any = await response.json(content_type=None)
        except ValueError:
            body = await response.text()
        return response.status, body
