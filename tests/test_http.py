"""HTTP basics: health endpoints and MWAP's envelope on every response."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from mwapjobs.api.envelope import ApiError, json_body, ok
from mwapjobs.daemon import Daemon
from mwapjobs.storage.mongo import Mongo
from tests.conftest import make_settings


@pytest.fixture
async def daemon(mongo: Mongo) -> AsyncIterator[Daemon]:
    d = Daemon(make_settings(http={"max_body_bytes": 1024}), mongo=mongo)
    await d.start()
    await d.wait_ready()
    yield d
    await d.stop()


def url(daemon: Daemon, path: str) -> str:
    return f"http://127.0.0.1:{daemon.port}{path}"


async def test_healthz_and_readyz_answer_in_the_envelope(daemon: Daemon) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(url(daemon, "/healthz")) as r:
            assert r.status == 200
            assert await r.json() == {"success": True, "data": {"status": "alive"}}
        async with http.get(url(daemon, "/readyz")) as r:
            assert r.status == 200
            body = await r.json()
            assert body["success"] is True and body["data"]["status"] == "ready"
            assert body["data"]["leader"] is True  # alone on its database, it leads
            assert body["data"]["instance"] == daemon.engine.owner
            assert r.headers["X-Correlation-Id"]


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/nope", 404, "http/not-found"),
        ("POST", "/healthz", 405, "http/method-not-allowed"),
        ("DELETE", "/readyz", 405, "http/method-not-allowed"),
    ],
)
async def test_errors_use_the_envelope(daemon: Daemon, method: str, path: str, status: int,
                                       code: str) -> None:
    async with aiohttp.ClientSession() as http, http.request(method, url(daemon, path)) as r:
        assert r.status == status
        assert r.content_type == "application/json"
        body = await r.json()
        assert body["success"] is False
        assert body["error"]["code"] == code
        assert body["error"]["message"]


async def _client_for(daemon: Daemon) -> TestClient[web.Request, web.Application]:
    app = daemon.app()

    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError("secret internals /etc/passwd line 42")

    async def echo(request: web.Request) -> web.Response:
        return ok(await json_body(request))

    async def teapot(request: web.Request) -> web.Response:
        raise ApiError(409, "queue/conflict", "already pending")

    app.router.add_get("/boom", boom)
    app.router.add_post("/echo", echo)
    app.router.add_get("/conflict", teapot)
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


async def test_unhandled_errors_are_500_without_internals(daemon: Daemon) -> None:
    client = await _client_for(daemon)
    try:
        r = await client.get("/boom")
        assert r.status == 500
        body = await r.json()
        assert body == {"success": False, "error": {"code": "server/internal-error",
                                                    "message": "Something went wrong on our side."}}
        assert "passwd" not in await r.text()
        r = await client.get("/conflict")
        assert r.status == 409
        assert (await r.json())["error"] == {"code": "queue/conflict", "message": "already pending"}
    finally:
        await client.close()


async def test_request_body_limit_and_json_validation(daemon: Daemon) -> None:
    client = await _client_for(daemon)
    try:
        r = await client.post("/echo", json={"a": 1})
        assert (await r.json()) == {"success": True, "data": {"a": 1}}
        r = await client.post("/echo", json={"a": "x" * 5000})
        assert r.status == 413
        assert (await r.json())["error"]["code"] == "http/payload-too-large"
        as_json = {"Content-Type": "application/json"}
        r = await client.post("/echo", data="{not json", headers=as_json)
        assert r.status == 400
        assert (await r.json())["error"]["code"] == "validation/invalid-json"
        r = await client.post("/echo", data="[1, 2]", headers=as_json)
        assert r.status == 400
        r = await client.post("/echo", data="a=1", headers={"Content-Type": "text/plain"})
        assert r.status == 415
    finally:
        await client.close()
