"""Outbound URLs are policy, not data: a provider document pointed somewhere else gets
none of the secrets, and the change is reported."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from mwapjobs.config import RefreshSettings
from mwapjobs.daemon import Daemon
from mwapjobs.jobs.health import probes
from mwapjobs.jobs.refresh.handler import TokenRefresher
from mwapjobs.jobs.refresh.runs import QUEUE, job_id
from mwapjobs.outbound import UrlPolicy
from mwapjobs.queues import Job, Postpone
from mwapjobs.storage.integrations import IntegrationStore
from mwapjobs.storage.mongo import Mongo
from mwapjobs.storage.names import PROVIDERS
from tests.conftest import make_settings, wait_for
from tests.support.mwap_data import (
    insert_integration,
    insert_provider,
    new_hex_id,
    test_cipher,
    utcnow,
)
from tests.support.oauth_server import OAuthServer

STRICT = UrlPolicy()  # what a production daemon runs with


@pytest.mark.parametrize(("url", "kind", "refused"), [
    ("https://oauth2.googleapis.com/token", "google", None),
    ("https://www.googleapis.com/drive/v3/about?fields=user", "google", None),
    ("https://api.dropboxapi.com/oauth2/token", "dropbox", None),
    ("https://login.microsoftonline.com/common/oauth2/v2.0/token", "microsoft", None),
    ("https://idp.example.org/token", "generic", None),  # other kinds: any https host
    ("http://oauth2.googleapis.com/token", "google", "https only"),
    ("http://idp.example.org/token", "generic", "https only"),
    ("https://attacker.example/token", "google", "not an allowed host"),
    ("https://googleapis.com.attacker.example/t", "google", "not an allowed host"),
    ("https://169.254.169.254/latest/meta-data/", "generic", "metadata"),
    ("https://[fd00:ec2::254]/latest", "generic", "metadata"),
    ("https://metadata.google.internal/computeMetadata/v1/", "google", "metadata"),
    ("http://127.0.0.1:8080/token", "generic", "this machine"),
    ("https://localhost/token", "google", "this machine"),
    ("ftp://idp.example.org/token", "generic", "http(s)"),
    ("idp.example.org/token", "generic", "http(s)"),
    ("https://idp.example.org:99999/token", "generic", "not a valid URL"),
])
def test_the_policy(url: str, kind: str, refused: str | None) -> None:
    reason = STRICT.refusal(url, kind)
    if refused is None:
        assert reason is None
    else:
        assert reason is not None and refused.replace("https only", "https") in reason


def test_loopback_only_when_allowed_and_operator_lists() -> None:
    local = UrlPolicy(allow_loopback=True)
    assert local.refusal("http://127.0.0.1:9/token", "google") is None
    assert local.refusal("http://10.0.0.1/token", "generic") is not None  # still http
    assert local.refusal("https://169.254.169.254/", "generic") is not None
    listed = UrlPolicy({"google": ["proxy.corp.example"], "generic": [".corp.example"]})
    assert listed.refusal("https://proxy.corp.example/token", "google") is None
    assert listed.refusal("https://oauth2.googleapis.com/token", "google") is not None
    assert listed.refusal("https://idp.corp.example/token", "generic") is None
    assert listed.refusal("https://idp.other.example/token", "generic") is not None


async def test_a_token_url_pointed_elsewhere_gets_no_secret(mongo: Mongo) -> None:
    """The provider document now names a server the policy refuses (here: this machine,
    as an attacker's would be): the refresh token and client secret are never sent, the
    provider is on hold, the tenant untouched."""
    cipher = test_cipher()
    with OAuthServer() as attacker:
        attacker.add_client("cid", "the-client-secret")
        provider = await insert_provider(mongo, cipher, token_url=attacker.token_url,
                                         client_id="cid", client_secret="the-client-secret")
        iid = await insert_integration(mongo, cipher, provider=provider,
                                       tenant_id=new_hex_id(), refresh_token="the-refresh-token",
                                       access_token="at", expires_in=30)
        before = await IntegrationStore(mongo).get(iid)
        async with aiohttp.ClientSession() as http:
            refresher = TokenRefresher(IntegrationStore(mongo), cipher, http,
                                       RefreshSettings(), utcnow, policy=STRICT)
            job = Job(run_id=new_hex_id(), queue=QUEUE, job_id=job_id(iid),
                      data={"integrationId": iid}, attempt=1, max_attempts=3,
                      created_at=utcnow(), deadline=None)
            with pytest.raises(Postpone, match="refused by the outbound policy"):
                await refresher(job)
        assert attacker.requests == []
        assert await IntegrationStore(mongo).get(iid) == before


@pytest.fixture
async def echoing_api() -> AsyncIterator[str]:
    async def handler(request: web.Request) -> web.Response:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        return web.json_response({"error": {"code": "internal", "message":
                                            f"bad token {token} (refresh with {token})"}},
                                 status=500)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}/me"
    await runner.cleanup()


async def test_a_probe_answer_echoing_the_token_keeps_no_token(echoing_api: str) -> None:
    spec = probes.ProbeSpec("generic", "GET", echoing_api)
    async with aiohttp.ClientSession() as http:
        result = await probes.probe(http, spec, "ya29.the-access-token-123", timeout=5,
                                    user_agent="test")
    assert result.verdict == "failure"
    assert "ya29.the-access-token-123" not in result.message
    assert "[redacted]" in result.message


async def test_a_changed_provider_url_is_logged_and_alerted(
        mongo: Mongo, caplog: pytest.LogCaptureFixture) -> None:
    provider = await insert_provider(mongo, test_cipher(),
                                     token_url="https://oauth2.googleapis.com/token",
                                     client_id="cid", client_secret="secret",
                                     name="Google Drive")
    daemon = Daemon(make_settings(refresh={"sync_interval": 3600}), mongo=mongo)
    await daemon.start()
    try:
        await daemon.wait_ready()
        sync = daemon.jobs["refresh"].discovery
        assert sync is not None
        await wait_for(lambda: sync.last_sync is not None, message="the first pass")
        await mongo.call(lambda db: db[PROVIDERS].update_one(
            {"_id": provider.id}, {"$set": {"tokenUrl": "https://collector.example/t?k=1"}}))
        with caplog.at_level(logging.WARNING):
            await sync.sync_once(full=True)
        [line] = [r for r in caplog.records if r.getMessage().startswith("provider URL changed")]
        fields: dict[str, Any] = line.__dict__
        assert (fields["field"], fields["to"]) == ("tokenUrl", "https://collector.example/t")
        assert fields["from"] == "https://oauth2.googleapis.com/token"
        messages = await daemon.alerts.evaluate()
        fired = [m for m in messages if "provider_url_changed" in m.text]
        assert len(fired) == 1 and "collector.example" in fired[0].text
        assert "k=1" not in fired[0].text  # a query could hold a key: never repeated
    finally:
        await daemon.stop()
