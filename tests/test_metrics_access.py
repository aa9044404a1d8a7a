"""/metrics on loopback is refused under a foreign Host name (DNS rebinding)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from mwapjobs.api.metrics import local_host_name
from mwapjobs.daemon import Daemon
from mwapjobs.storage.mongo import Mongo
from tests.conftest import make_settings


@pytest.mark.parametrize(("host", "local"), [
    ("localhost:8080", True), ("LOCALHOST", True), ("127.0.0.1:8080", True),
    ("127.5.6.7", True), ("[::1]:8080", True), ("::1", True),
    ("metrics.internal:8080", True),  # listed in metrics.hosts
    ("evil.example", False), ("evil.example:8080", False), ("10.0.0.5:8080", False),
    ("localhost.evil.example", False), ("", False),
])
def test_local_host_names(host: str, local: bool) -> None:
    assert local_host_name(host, ["metrics.internal"]) is local


@pytest.fixture
async def daemon(mongo: Mongo) -> AsyncIterator[Daemon]:
    d = Daemon(make_settings(metrics={"hosts": ["prom.internal"]}), mongo=mongo)
    await d.start()
    yield d
    await d.stop()


@pytest.mark.parametrize(("host", "status"), [
    (None, 200), ("localhost", 200), ("prom.internal:9999", 200), ("attacker.example", 403),
])
async def test_metrics_refuse_a_rebound_host(daemon: Daemon, host: str | None,
                                             status: int) -> None:
    headers = {"Host": host} if host else {}
    async with aiohttp.ClientSession() as http, http.get(
            f"http://127.0.0.1:{daemon.port}/metrics", headers=headers) as r:
        assert r.status == status, await r.text()
