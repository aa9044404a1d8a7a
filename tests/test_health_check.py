"""Integration health checks against simulated provider APIs and a real OAuth token endpoint.

The daemon runs in-process on the embedded store with a local aiohttp server
playing Dropbox, Google Drive, Microsoft Graph and a generic API
(tests/support/providers.py) and Authlib's token endpoint
(tests/support/oauth_server.py) for the refreshes a 401 sets off. MWAP's
documents are seeded as the backend writes them (tests/support/mwap_data.py).

Three levels: the probe and its classification alone; a sweep
(`HealthChecker.sweep`, awaited, so a test sees every write of the sweep
when it returns); and the schedule and the HTTP API.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import aiohttp
import pytest
from bson import ObjectId

from mwapjobs.api.auth import Authenticator
from mwapjobs.daemon import Daemon
from mwapjobs.jobs.health import probes
from mwapjobs.jobs.health import sweep as health_check
from mwapjobs.jobs.health.probes import ProbeSpec, classify, probe, probe_spec, provider_kind
from mwapjobs.jobs.health.schedule import (
    QUEUE,
    SPREAD_FRACTION,
    SWEEP_JOB_ID,
    offset_fraction,
    spread_window,
)
from mwapjobs.jobs.health.sweep import HealthChecker, SweepReport
from mwapjobs.jobs.refresh.runs import MANUAL_PRIORITY
from mwapjobs.storage.identity import IdentityStore
from mwapjobs.storage.integrations import IntegrationStore
from mwapjobs.storage.mongo import Mongo
from mwapjobs.storage.names import INTEGRATION_STATE, RUNS
from mwapjobs.storage.providers import ProviderHolds
from tests.conftest import make_settings, wait_for
from tests.support.jwks import JwksServer
from tests.support.mwap_data import (
    ABSENT,
    SeededProvider,
    get_integration,
    insert_integration,
    insert_provider,
    insert_superadmin,
    insert_tenant,
    integration_state,
    notifications,
    refresh_runs,
    test_cipher,
    update_integration,
    utcnow,
)
from tests.support.oauth_server import Fault, OAuthServer
from tests.support.providers import KINDS, ProviderServer, Reply

CID, SECRET = "mwap-client", "s3cret"
OWNER_A, OWNER_B = "auth0|owner-a", "auth0|owner-b"
ADMIN_TOKEN = "mwapjobs-admin-token-for-health-tests-0123456789"


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oauth_server() -> Iterator[OAuthServer]:
    with OAuthServer() as server:
        yield server


@pytest.fixture
def oauth(oauth_server: OAuthServer) -> Iterator[OAuthServer]:
    oauth_server.reset()
    oauth_server.add_client(CID, SECRET)
    yield oauth_server
    oauth_server.reset()


@pytest.fixture
async def providers() -> AsyncIterator[ProviderServer]:
    async with ProviderServer() as server:
        yield server


@dataclass
class World:
    daemon: Daemon
    mongo: Mongo
    oauth: OAuthServer
    api: ProviderServer
    provider: dict[str, SeededProvider]
    tenant_a: str
    tenant_b: str
    idp: JwksServer | None

    @property
    def checker(self) -> HealthChecker:
        assert self.daemon.jobs["health"] is not None
        return self.daemon.jobs["health"]

    async def integration(self, kind: str = "google", *, status: str = "active",
                          refresh: bool = True, tenant: str | None = None,
                          integration_id: str | None = None,
                          **options: Any) -> tuple[str, str]:
        """Seed a connected integration; returns (id, its plaintext access token)."""
        access = options.pop("access_token", f"at-{kind}-{time.monotonic_ns()}")
        options.setdefault("refresh_token",
                           self.oauth.issue_refresh_token(CID) if refresh else ABSENT)
        iid = await insert_integration(self.mongo, test_cipher(), provider=self.provider[kind],
                                       tenant_id=tenant or self.tenant_a, status=status,
                                       access_token=access, integration_id=integration_id,
                                       **options)
        return iid, access

    async def sweep(self, window: float = 0.0) -> SweepReport:
        return await self.checker.sweep(window=window)

    async def doc(self, iid: str) -> dict[str, Any]:
        doc = await get_integration(self.mongo, iid)
        assert doc is not None
        return doc

    async def health(self, iid: str) -> dict[str, Any]:
        state = await integration_state(self.mongo, iid)
        assert state is not None and isinstance(state.get("health"), dict), state
        health: dict[str, Any] = state["health"]
        return health

    async def outcome(self, iid: str) -> str:
        return str((await self.health(iid))["lastResult"]["outcome"])

    def bearer(self, who: str) -> dict[str, str]:
        if who == "admin":
            return {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        assert self.idp is not None
        return {"Authorization": f"Bearer {self.idp.token(who)}"}

    async def http(self, method: str, path: str, who: str | None = "admin"
                   ) -> tuple[int, dict[str, Any]]:
        url = f"http://127.0.0.1:{self.daemon.port}{path}"
        headers = self.bearer(who) if who else {}
        async with aiohttp.ClientSession() as http, \
                http.request(method, url, headers=headers) as resp:
            return resp.status, json.loads(await resp.text())


@asynccontextmanager
async def world(mongo: Mongo, oauth: OAuthServer, api: ProviderServer,
                idp: JwksServer | None = None, **health: Any) -> AsyncIterator[World]:
    kinds: dict[str, SeededProvider] = {}
    for kind in KINDS:
        kinds[kind] = await insert_provider(mongo, test_cipher(), token_url=oauth.token_url,
                                            client_id=CID, client_secret=SECRET,
                                            metadata=api.metadata(kind), name=f"Test {kind}")
    tenant_a = await insert_tenant(mongo, OWNER_A)
    tenant_b = await insert_tenant(mongo, OWNER_B)
    settings = make_settings(
        health={"request_timeout": 0.5, "failure_threshold": 3, "history_size": 5,
                "concurrency": 8, "provider_concurrency": 4, "provider_rate": 1000, **health},
        refresh={"lead": 60, "jitter": 0, "sync_interval": 3600, "wait_timeout": 10},
        queues={"token-refresh": {"attempts": 2, "backoff": {"delay": 0.05, "jitter": 0}}},
        admin={"tokens": [{"name": "ops",
                           "sha256": hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()}]},
        **({"auth0_domain": "idp.test", "auth0_audience": idp.audience} if idp else {}),
    )
    daemon = Daemon(settings, mongo=mongo)
    jwks = idp.cache() if idp else None
    if jwks is not None:
        daemon.auth = Authenticator(settings, IdentityStore(mongo), jwks)
    await daemon.start()
    try:
        await daemon.wait_ready()
        sync = daemon.jobs["refresh"].discovery
        assert sync is not None
        # Discovery's first pass is over before anything is seeded (and the next is an hour
        # away), so only the health checks set off refreshes here.
        await wait_for(lambda: sync.last_sync is not None, message="first discovery pass")
        yield World(daemon, mongo, oauth, api, kinds, tenant_a, tenant_b, idp)
    finally:
        await daemon.stop()
        if jwks is not None:
            await jwks.close()


@pytest.fixture
async def w(mongo: Mongo, oauth: OAuthServer, providers: ProviderServer) -> AsyncIterator[World]:
    async with world(mongo, oauth, providers) as it:
        yield it


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# -- the probes alone ---------------------------------------------------------------------


def test_provider_kind_and_probe_urls() -> None:
    assert provider_kind({"metadata": {"providerType": "dropbox"}}) == "dropbox"
    assert provider_kind({"slug": "google-drive", "metadata": {"providerType": "oauth2"}}) == \
        "google"
    assert provider_kind({"name": "Microsoft OneDrive"}) == "microsoft"
    assert provider_kind({"slug": "box", "name": "Box"}) == "generic"

    assert probe_spec({"slug": "dropbox"}) == ProbeSpec(
        "dropbox", "POST", "https://api.dropboxapi.com/2/users/get_current_account", True)
    assert probe_spec({"slug": "dropbox", "metadata": {"apiBaseUrl": "https://dbx.test/2/"}}
                      ).url == "https://dbx.test/2/users/get_current_account"
    assert probe_spec({"slug": "google"}).url == \
        "https://www.googleapis.com/drive/v3/about?fields=user"
    assert probe_spec({"slug": "onedrive"}).url == "https://graph.microsoft.com/v1.0/me/drive"
    assert probe_spec({"slug": "onedrive", "metadata": {"healthCheckUrl": "https://p.test/me"}}
                      ).url == "https://p.test/me"
    assert probe_spec({"slug": "box", "metadata": {"apiBaseUrl": "https://api.box.test/2.0"}}
                      ) == ProbeSpec("generic", "GET", "https://api.box.test/2.0")
    assert probe_spec({"slug": "box"}).url is None  # nothing to probe: skipped
    assert probe_spec({"slug": "box", "metadata": {"apiBaseUrl": "javascript:alert(1)"}}
                      ).url is None


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


DROPBOX = ProbeSpec("dropbox", "POST", "https://api.dropboxapi.com/2/x", True)
GOOGLE = ProbeSpec("google", "GET", "https://www.googleapis.com/drive/v3/about?fields=user")
GRAPH = ProbeSpec("microsoft", "GET", "https://graph.microsoft.com/v1.0/me/drive")
GENERIC = ProbeSpec("generic", "GET", "https://api.example.test/")


@pytest.mark.parametrize(("spec", "status", "headers", "body", "verdict", "words"), [
    (DROPBOX, 200, {}, _json({"account_id": "dbid:1"}), "ok", "HTTP 200"),
    (GOOGLE, 200, {}, _json({"user": {}}), "ok", "HTTP 200"),
    (GRAPH, 200, {}, _json({"id": "b!1"}), "ok", "HTTP 200"),
    (GENERIC, 204, {}, b"", "ok", "HTTP 204"),
    (GOOGLE, 200, {}, _json({"kind": "drive#about"}), "failure", "no 'user'"),
    (DROPBOX, 200, {}, b"<html>sign in</html>", "failure", "not JSON"),
    (DROPBOX, 401, {}, _json({"error_summary": "expired_access_token/..",
                              "error": {".tag": "expired_access_token"}}),
     "unauthorized", "expired_access_token"),
    (DROPBOX, 401, {}, _json({"error_summary": "invalid_access_token/..",
                              "error": {".tag": "invalid_access_token"}}),
     "unauthorized", "invalid_access_token"),
    (DROPBOX, 401, {}, _json({"error_summary": "user_suspended/..",
                              "error": {".tag": "user_suspended"}}), "revoked", "revoked"),
    (GRAPH, 401, {}, _json({"error": {"code": "InvalidAuthenticationToken"}}),
     "unauthorized", "InvalidAuthenticationToken"),
    (GENERIC, 401, {"WWW-Authenticate": 'Bearer error="invalid_token"'}, b"", "unauthorized",
     "invalid_token"),
    (GOOGLE, 403, {}, _json({"error": {"code": 403, "status": "PERMISSION_DENIED", "errors": [
        {"reason": "insufficientPermissions"}]}}), "forbidden", "PERMISSION_DENIED"),
    (GOOGLE, 403, {}, _json({"error": {"code": 403, "errors": [
        {"reason": "userRateLimitExceeded"}]}}), "failure", "rate or quota"),
    (GRAPH, 403, {"Retry-After": "5"}, _json({"error": {"code": "accessDenied"}}),
     "failure", "rate or quota"),
    (GRAPH, 403, {}, _json({"error": {"code": "accessDenied"}}), "forbidden", "accessDenied"),
    (GOOGLE, 429, {}, b"", "failure", "rate limited"),
    (GOOGLE, 500, {}, b"oops", "failure", "HTTP 500"),
    (GOOGLE, 404, {}, b"", "failure", "HTTP 404"),
    (GOOGLE, 302, {"Location": "https://evil.test/x"}, b"", "failure", "another host evil.test"),
])
def test_classify(spec: ProbeSpec, status: int, headers: dict[str, str], body: bytes,
                  verdict: str, words: str) -> None:
    revoked = probes.REVOKED_ERRORS[spec.kind]
    got, message = classify(spec, status, headers, body, revoked)
    assert (got, words in message) == (verdict, True), message


def test_revocation_codes_can_be_added_per_provider() -> None:
    provider = {"slug": "google", "metadata": {"healthRevokedErrors": ["accountDisabled"]}}
    codes = probes.revoked_errors(provider, "google")
    body = _json({"error": {"code": 401, "errors": [{"reason": "accountDisabled"}]}})
    assert classify(GOOGLE, 401, {}, body, codes)[0] == "revoked"
    assert classify(GOOGLE, 401, {}, body, probes.revoked_errors({}, "google"))[0] == \
        "unauthorized"


async def test_each_probe_is_the_request_the_provider_api_expects(
        providers: ProviderServer) -> None:
    async with aiohttp.ClientSession() as http:
        for kind in KINDS:
            spec = probe_spec({"metadata": providers.metadata(kind)})
            result = await probe(http, spec, f"token-{kind}", timeout=2, user_agent="ua/1")
            assert result.verdict == "ok", (kind, result)
            assert result.http_status == 200 and result.latency_ms is not None
    seen = {p.kind: p for p in providers.requests}
    assert {k: seen[k].token for k in KINDS} == {k: f"token-{k}" for k in KINDS}
    dropbox = seen["dropbox"]
    assert (dropbox.method, dropbox.content_type, dropbox.body) == (
        "POST", "application/json", b"null")
    assert dropbox.path == "/dropbox/dropbox/2/users/get_current_account"
    assert (seen["google"].method, seen["google"].query) == ("GET", "fields=user")
    assert (seen["microsoft"].method, seen["microsoft"].path) == (
        "GET", "/microsoft/graph/v1.0/me/drive")
    assert (seen["generic"].method, seen["generic"].path) == ("GET", "/generic/generic/api")


async def test_timeouts_network_errors_and_redirects_are_failures(
        providers: ProviderServer) -> None:
    google = probe_spec({"metadata": providers.metadata("google")})
    providers.reply("hangs", Reply.hang_forever())
    async with ProviderServer() as elsewhere, aiohttp.ClientSession() as http:
        started = time.monotonic()
        hung = await probe(http, google, "hangs", timeout=0.3, user_agent="ua")
        assert hung.verdict == "failure" and "no answer within 0.3s" in hung.message
        assert time.monotonic() - started < 2

        dead = ProbeSpec("google", "GET", f"http://127.0.0.1:{closed_port()}/about")
        refused = await probe(http, dead, "t", timeout=2, user_agent="ua")
        assert refused.verdict == "failure" and "network error" in refused.message
        assert "t" not in refused.message.split("network error")[0]

        target = f"{elsewhere.url}/google/google/drive/v3/about?fields=user"
        providers.reply("moved", Reply.redirect(target))
        moved = await probe(http, google, "moved", timeout=2, user_agent="ua")
        assert moved.verdict == "failure" and moved.http_status == 302
        assert "another host 127.0.0.1:" in moved.message and "not followed" in moved.message
        assert elsewhere.requests == []  # the bearer token never went there


# -- sweeps: each row of the rules --------------------------------------------------------


async def test_healthy_integrations_are_recorded_with_their_history(w: World) -> None:
    ids = [(await w.integration(kind))[0] for kind in KINDS]
    report = await w.sweep()
    assert (report.integrations, report.checked, report.healthy) == (4, 4, 4)
    for iid in ids:
        health = await w.health(iid)
        last = health["lastResult"]
        assert (last["outcome"], last["status"], last["httpStatus"]) == ("healthy", "active", 200)
        assert last["latencyMs"] >= 0 and last["message"] == "HTTP 200"
        assert health["consecutiveFailures"] == 0 and health["history"] == [last]
        assert health["lastHealthyAt"] == last["at"] == health["lastCheckedAt"]
        assert (await w.doc(iid))["status"] == "active"
    for _ in range(6):
        await w.sweep()
    history = (await w.health(ids[0]))["history"]
    assert len(history) == 5  # health.history_size
    assert [h["at"] for h in history] == sorted(h["at"] for h in history)


async def test_never_probes_revoked_or_unconnected_integrations(w: World) -> None:
    revoked, revoked_token = await w.integration("google", status="revoked")
    unconnected, _ = await w.integration("google", access_token=None)
    report = await w.sweep()
    assert report.integrations == 0 and w.api.requests == []
    assert (await w.doc(revoked))["status"] == "revoked"
    assert await integration_state(w.mongo, revoked) is None
    assert await integration_state(w.mongo, unconnected) is None
    assert revoked_token not in w.api.tokens_seen()


async def test_a_stale_token_is_refreshed_at_high_priority_then_probed_again(w: World) -> None:
    iid, old = await w.integration("dropbox")
    w.api.reply(old, Reply.unauthorized())
    report = await w.sweep()
    assert (report.healthy, report.refreshed) == (1, 1)
    doc = await w.doc(iid)
    new = test_cipher().decrypt(doc["accessToken"])
    assert new != old and doc["status"] == "active"
    assert w.api.tokens_seen() == [old, new]
    [run] = await refresh_runs(w.mongo, iid, ("waiting", "active", "completed", "failed"))
    assert (run["state"], run["priority"]) == ("completed", MANUAL_PRIORITY)
    assert [r.path for r in w.oauth.requests] == ["/oauth/token"]
    last = (await w.health(iid))["lastResult"]
    assert (last["outcome"], last["refreshed"]) == ("healthy", True)
    assert await notifications(w.mongo, iid) == []


async def test_a_token_past_its_expiry_is_refreshed_before_any_probe(w: World) -> None:
    iid, old = await w.integration("google", expires_in=-60)
    report = await w.sweep()
    assert (report.healthy, report.refreshed) == (1, 1)
    new = test_cipher().decrypt((await w.doc(iid))["accessToken"])
    assert w.api.tokens_seen() == [new]  # the expired token was never sent
    assert old not in w.api.tokens_seen()


async def test_a_refused_refresh_makes_it_expired_with_one_notification(w: World) -> None:
    iid, old = await w.integration("microsoft")
    doc = await w.doc(iid)
    w.oauth.revoke(test_cipher().decrypt(doc["refreshToken"]))
    w.api.reply(old, Reply.unauthorized())
    report = await w.sweep()
    assert report.expired == 1
    assert (await w.doc(iid))["status"] == "expired"
    [note] = await notifications(w.mongo, iid)
    assert note["kind"] == "integration.expired" and "invalid_grant" in note["reason"]
    health = await w.health(iid)
    assert health["lastResult"]["outcome"] == "expired"
    assert health["setStatus"] is None  # the refresher set it; a later 200 must not undo it
    w.api.reply(old, Reply.ok())
    await w.sweep()
    assert (await w.doc(iid))["status"] == "expired"
    assert await w.outcome(iid) == "healthy"


async def test_a_refresh_that_fails_for_now_is_a_counted_failure(w: World) -> None:
    iid, old = await w.integration("google", expires_in=7200)
    w.api.reply(old, Reply.unauthorized())
    w.oauth.script(Fault(503), Fault(503))  # both attempts of the refresh run
    report = await w.sweep()
    assert report.failing == 1
    health = await w.health(iid)
    assert health["consecutiveFailures"] == 1
    assert "did not succeed" in health["lastResult"]["message"]
    assert (await w.doc(iid))["status"] == "active"


async def test_a_held_provider_never_expires_or_fails_its_tenants(
        w: World, monkeypatch: pytest.MonkeyPatch) -> None:
    stale, stale_token = await w.integration("google")
    past, _ = await w.integration("google", expires_in=-60)  # refreshed before any probe
    w.api.reply(stale_token, Reply.unauthorized())
    w.oauth.add_client(CID, "rotated-at-the-provider")  # our client secret is now wrong
    before = {iid: await w.doc(iid) for iid in (stale, past)}
    started = time.monotonic()

    report = await w.sweep()

    assert time.monotonic() - started < 5  # a postponed refresh is not waited out
    assert (report.skipped, report.expired, report.failing, report.error) == (2, 0, 0, 0)
    hold = (await ProviderHolds(w.mongo).state(w.provider["google"].hex) or {}).get("hold")
    assert hold is not None and hold["error"] == "invalid_client"
    refused = len([r for r in w.oauth.requests if r.path == "/oauth/token"])
    assert 1 <= refused <= 2  # those in flight before the hold was known; then none
    for _ in range(3):  # failure_threshold sweeps: still nothing counted or changed
        report = await w.sweep()
        assert (report.skipped, report.failing, report.error) == (2, 0, 0)
    for iid in (stale, past):
        assert await w.doc(iid) == before[iid]
        assert await notifications(w.mongo, iid) == []
        health = await w.health(iid)
        assert health["consecutiveFailures"] == 0 and health["setStatus"] is None
        assert health["lastResult"]["outcome"] == "skipped"
        assert "provider is on hold" in health["lastResult"]["message"]
        assert "status unchanged" in health["lastResult"]["message"]
    assert len([r for r in w.oauth.requests if r.path == "/oauth/token"]) == refused


async def test_a_401_without_a_refresh_token_makes_it_expired(w: World) -> None:
    iid, old = await w.integration("generic", refresh=False)
    w.api.reply(old, Reply.unauthorized())
    await w.sweep()
    assert (await w.doc(iid))["status"] == "expired"
    [note] = await notifications(w.mongo, iid)
    assert note["kind"] == "integration.expired" and "no refresh token" in note["reason"]
    assert (await w.health(iid))["setStatus"] == "expired"
    assert w.oauth.requests == []


async def test_a_401_that_persists_after_the_refresh_is_a_failure_not_revoked(w: World) -> None:
    iid, _ = await w.integration("google")
    w.api.default = Reply.unauthorized()  # the freshly refreshed token is refused too
    await w.sweep()
    assert (await w.doc(iid))["status"] == "active"
    health = await w.health(iid)
    assert health["consecutiveFailures"] == 1
    assert "even just after a token refresh" in health["lastResult"]["message"]


async def test_an_explicit_revocation_makes_it_revoked_without_a_refresh(w: World) -> None:
    iid, old = await w.integration("dropbox")
    w.api.reply(old, Reply.suspended())
    report = await w.sweep()
    assert report.revoked == 1
    assert (await w.doc(iid))["status"] == "revoked"
    [note] = await notifications(w.mongo, iid)
    assert note["kind"] == "integration.revoked" and "user_suspended" in note["reason"]
    assert note["tenantId"] == w.tenant_a and note["createdAt"]
    assert w.oauth.requests == []
    await w.sweep()  # revoked: never probed again
    assert w.api.tokens_seen() == [old]


async def test_403_expires_unless_it_is_a_rate_limit_and_a_200_undoes_our_expired(
        w: World) -> None:
    denied, denied_token = await w.integration("google")
    limited, limited_token = await w.integration("google")
    w.api.reply(denied_token, Reply.forbidden())
    w.api.reply(limited_token, Reply.rate_limited_403())
    await w.sweep()
    assert (await w.doc(denied))["status"] == "expired"
    assert [n["kind"] for n in await notifications(w.mongo, denied)] == ["integration.expired"]
    assert (await w.doc(limited))["status"] == "active"
    assert await w.outcome(limited) == "failing"
    assert await notifications(w.mongo, limited) == []

    w.api.reply(denied_token, Reply.ok())
    await w.sweep()
    assert (await w.doc(denied))["status"] == "active"  # we set expired, so we undo it
    assert (await w.health(denied))["setStatus"] is None
    assert len(await notifications(w.mongo, denied)) == 1


async def test_an_expired_or_error_status_we_did_not_set_is_left_alone(w: World) -> None:
    expired, _ = await w.integration("google", status="expired")
    error, _ = await w.integration("microsoft", status="error")
    await w.sweep()
    assert (await w.doc(expired))["status"] == "expired"
    assert (await w.doc(error))["status"] == "error"
    assert await w.outcome(expired) == await w.outcome(error) == "healthy"


async def test_transient_failures_become_error_only_at_the_threshold(
        w: World, caplog: pytest.LogCaptureFixture) -> None:
    flaky, flaky_token = await w.integration("dropbox")
    hiccup, hiccup_token = await w.integration("google")
    w.api.script(flaky_token, Reply.error(500), Reply.hang_forever(), Reply.wrong_json(),
                 Reply.not_json(), Reply.ok())
    w.api.script(hiccup_token, Reply.error(502), Reply.error(503), Reply.ok(), Reply.error(500),
                 Reply.error(500))
    expected = [("failing", "active", 1), ("failing", "active", 2), ("error", "error", 3),
                ("error", "error", 4), ("healthy", "active", 0)]
    with caplog.at_level(logging.WARNING, logger="mwapjobs.jobs.health_check"):
        for outcome, status, streak in expected:
            await w.sweep()
            health = await w.health(flaky)
            assert (health["lastResult"]["outcome"], (await w.doc(flaky))["status"],
                    health["consecutiveFailures"]) == (outcome, status, streak)
            assert (await w.doc(hiccup))["status"] == "active"  # never 3 failures in a row
    assert (await w.health(hiccup))["consecutiveFailures"] == 2
    messages = [h["message"] for h in (await w.health(flaky))["history"]]
    assert "HTTP 500" in messages[0] and "no answer within" in messages[1]
    assert "no 'account_id'" in messages[2] and "not JSON" in messages[3]
    logged = [r for r in caplog.records if r.getMessage() == "health check failed"
              and getattr(r, "integrationId", None) == flaky]
    assert len(logged) == 4  # every failure is logged, not only the one that changed things
    assert await notifications(w.mongo, flaky) == []


async def test_network_errors_count_towards_error(mongo: Mongo, oauth: OAuthServer,
                                                   providers: ProviderServer) -> None:
    async with world(mongo, oauth, providers, failure_threshold=2) as w:
        down = await insert_provider(
            mongo, test_cipher(), token_url=oauth.token_url, client_id=CID,
            client_secret=SECRET, name="Down",
            metadata={"providerType": "google",
                      "healthCheckUrl": f"http://127.0.0.1:{closed_port()}/about"})
        w.provider["down"] = down
        iid, _ = await w.integration("down")
        await w.sweep()
        assert (await w.doc(iid))["status"] == "active"
        await w.sweep()
        assert (await w.doc(iid))["status"] == "error"
        assert "network error" in (await w.health(iid))["lastResult"]["message"]


async def test_a_provider_without_a_probe_url_is_skipped(w: World) -> None:
    bare = await insert_provider(w.mongo, test_cipher(), token_url=w.oauth.token_url,
                                 client_id=CID, client_secret=SECRET, name="Bare",
                                 metadata={"providerType": "test"})
    w.provider["bare"] = bare
    iid, _ = await w.integration("bare")
    report = await w.sweep()
    assert report.skipped == 1
    health = await w.health(iid)
    assert health["lastResult"]["outcome"] == "skipped"
    assert "metadata.healthCheckUrl" in health["lastResult"]["message"]


async def test_a_token_changed_during_a_spread_sweep_is_read_again(
        w: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(health_check, "TOKEN_MAX_AGE", 0.05)
    iid = next(f"{n:024x}" for n in range(1000) if 0.5 < offset_fraction(f"{n:024x}") < 0.9)
    await w.integration("google", integration_id=iid)
    sweep = asyncio.ensure_future(w.sweep(window=1.0))
    await wait_for(lambda: w.checker.progress() is not None, message="sweep planned")
    await update_integration(w.mongo, iid, {"accessToken": test_cipher().encrypt("at-reconnected")})
    await sweep
    assert w.api.tokens_seen() == ["at-reconnected"]


# -- batched writes ---------------------------------------------------------------------------


async def test_record_health_updates_only_its_batch_in_one_query(mongo: Mongo) -> None:
    store = IntegrationStore(mongo)
    ids = [f"{n:024x}" for n in range(11)]
    await store.create_health_states(ids[:10])
    # Notes the refresher made (no health yet), inside the range of the batch:
    await mongo.call(lambda db: db[INTEGRATION_STATE].insert_one(
        {"_id": ids[10][:-1] + "4z", "refreshFailure": {"token": "t"}}))
    ids[10] = ids[10][:-1] + "4z"
    await mongo.call(lambda db: db[INTEGRATION_STATE].update_one(
        {"_id": ids[3]}, {"$set": {"health.consecutiveFailures": 2, "refreshFailure": {"x": 1}}}))
    before = {d["_id"]: d for d in await mongo.call(
        lambda db: db[INTEGRATION_STATE].find({}).to_list(None))}
    now = utcnow()
    now = now.replace(microsecond=now.microsecond // 1000 * 1000)  # BSON keeps milliseconds

    def result(n: int, streak: int) -> tuple[str, dict[str, Any]]:
        entry = {"at": now, "outcome": f"o{n}", "latencyMs": float(n)}
        return ids[n], {"at": now, "entry": entry, "consecutiveFailures": streak,
                        "setStatus": None, "lastHealthyAt": None, "lastFailureAt": now,
                        "tenantId": "t", "providerId": "p"}

    trips = mongo.round_trips
    changed = await store.record_health([result(1, 1), result(3, 3), result(5, 0),
                                         result(7, 0)], history_size=2)
    assert mongo.round_trips - trips == 1 and changed == 4
    after = {d["_id"]: d for d in await mongo.call(
        lambda db: db[INTEGRATION_STATE].find({}).to_list(None))}
    for n in (0, 2, 4, 6, 8, 9, 10):
        assert after[ids[n]] == before[ids[n]]  # in the id range or not: untouched
    assert after[ids[3]]["health"]["consecutiveFailures"] == 3
    assert after[ids[3]]["refreshFailure"] == {"x": 1}
    assert after[ids[1]]["health"]["consecutiveFailures"] == 1
    assert after[ids[5]]["health"]["lastFailureAt"] == now
    assert after[ids[5]]["health"]["lastResult"]["outcome"] == "o5"
    assert after[ids[5]]["health"]["history"][0]["outcome"] == "o5"
    for _ in range(3):
        await store.record_health([result(5, 1)], history_size=2)
    assert len((await store.state(ids[5]) or {})["health"]["history"]) == 2


async def test_a_large_sweep_writes_in_a_few_batches(w: World,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    for n in range(300):
        await w.integration(KINDS[n % 4], refresh=False)
    # Count only the sweep's own queries: those made in its task and the tasks it starts
    # (they inherit its context), not the daemon's background traffic meanwhile.
    in_sweep: ContextVar[bool] = ContextVar("in_sweep", default=False)
    trips = 0
    call = w.mongo.call

    async def counted(op: Any) -> Any:
        nonlocal trips
        trips += in_sweep.get()
        return await call(op)

    monkeypatch.setattr(w.mongo, "call", counted)

    async def sweep() -> SweepReport:
        in_sweep.set(True)
        return await w.sweep()

    report = await asyncio.create_task(sweep())
    assert report.healthy == 300 and report.writes <= 10
    # reads (3) + missing notes (1) + batched results: nothing per integration
    assert 0 < trips <= 4 + report.writes
    states = await w.mongo.call(lambda db: db[INTEGRATION_STATE].find({}).to_list(None))
    assert sorted(len(s["health"]["history"]) for s in states) == [1] * 300


# -- spreading, limits, no overlap ----------------------------------------------------------


FIXED_IDS = [f"{n:024x}" for n in range(1, 21)]


async def _arrivals(w: World, window: float) -> dict[str, float]:
    """Run one sweep; each integration's probe arrival minus the sweep's estimated start."""
    w.api.clear_stats()
    report = await w.sweep(window=window)
    assert report.healthy == len(FIXED_IDS)
    by_token = {p.token: p.arrived for p in w.api.requests}
    arrivals = {iid: by_token[f"at-{iid}"] for iid in FIXED_IDS}
    # The start of the sweep, from the probes themselves: median of arrival - offset.
    starts = sorted(arrivals[i] - offset_fraction(i) * window for i in FIXED_IDS)
    t0 = starts[len(starts) // 2]
    return {i: arrivals[i] - t0 for i in FIXED_IDS}


async def test_probes_are_spread_over_the_interval_deterministically(w: World) -> None:
    for n, iid in enumerate(FIXED_IDS):
        await w.integration(("google", "dropbox")[n % 2], integration_id=iid,
                            access_token=f"at-{iid}")
    # A 2-second interval repeat: the sweep spreads over SPREAD_FRACTION of it.
    window = spread_window({"spread": True, "every": 2}, utcnow(), utcnow(), w.checker.settings)
    assert window == pytest.approx(2 * SPREAD_FRACTION, abs=0.05)
    first = await _arrivals(w, window)
    for iid in FIXED_IDS:
        assert first[iid] == pytest.approx(offset_fraction(iid) * window, abs=0.15), iid
    fractions = [offset_fraction(i) for i in FIXED_IDS]
    assert max(fractions) - min(fractions) > 0.7  # these fixed ids cover most of it
    assert max(first.values()) - min(first.values()) == pytest.approx(
        (max(fractions) - min(fractions)) * window, abs=0.2)
    second = await _arrivals(w, window)
    for iid in FIXED_IDS:  # same place in the interval every time
        assert second[iid] == pytest.approx(first[iid], abs=0.15), iid
    assert spread_window({"spread": False}, utcnow(), utcnow(), w.checker.settings) == 0.0


async def test_without_spreading_probes_run_as_fast_as_the_limits_allow(
        mongo: Mongo, oauth: OAuthServer) -> None:
    async with ProviderServer(latency=0.1) as slow, \
            world(mongo, oauth, slow, concurrency=4, provider_concurrency=3) as w:
        for n in range(20):
            await w.integration(("google", "dropbox")[n % 2], refresh=False)
        started = time.monotonic()
        report = await w.sweep()
        elapsed = time.monotonic() - started
        assert report.healthy == 20
        assert slow.peak == 4 and max(slow.peak_by_tag.values()) == 3  # used, never exceeded
        assert 0.45 < elapsed < 0.9, elapsed  # 20 probes x 0.1 s / 4 in flight = 0.5 s


async def test_probe_starts_respect_the_provider_rate(mongo: Mongo, oauth: OAuthServer,
                                                      providers: ProviderServer) -> None:
    async with world(mongo, oauth, providers, provider_rate=20) as w:
        for _ in range(6):
            await w.integration("microsoft", refresh=False)
        await w.sweep()
        starts = sorted(p.arrived for p in providers.requests)
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        assert len(starts) == 6 and min(gaps) > 0.04, gaps  # 1/20 s apart


async def test_a_slow_provider_does_not_hold_up_the_others(mongo: Mongo, oauth: OAuthServer,
                                                           providers: ProviderServer) -> None:
    async with world(mongo, oauth, providers, concurrency=4, provider_concurrency=2,
                     request_timeout=5) as w:
        for _ in range(4):
            _, token = await w.integration("dropbox", refresh=False)
            providers.reply(token, Reply.slow(1.0))
        for _ in range(8):
            await w.integration("google", refresh=False)
        sweep = asyncio.ensure_future(w.sweep())
        # Google's 8 probes finish while Dropbox's lanes still wait on their slow answers.
        await wait_for(lambda: sum(p.kind == "google" and p.finished is not None
                                   for p in providers.requests) == 8, timeout=0.8,
                       message="the fast provider done within the slow one's first answer")
        await sweep


async def test_a_sweep_still_running_when_the_next_is_due_is_not_doubled(
        mongo: Mongo, oauth: OAuthServer, providers: ProviderServer,
        caplog: pytest.LogCaptureFixture) -> None:
    async with world(mongo, oauth, providers, request_timeout=2.5) as w:
        _, token = await w.integration("google", refresh=False)
        providers.script(token, Reply.hang_forever())  # the first sweep lasts 2.5 s
        caplog.set_level(logging.INFO, logger="mwapjobs.engine")

        async def runs() -> list[dict[str, Any]]:
            docs: list[dict[str, Any]] = await mongo.call(
                lambda db: db[RUNS].find({"queue": QUEUE}).sort("createdAt", 1).to_list(None))
            return docs

        await w.daemon.engine.repeat(QUEUE, {"spread": False}, every=1, job_id=SWEEP_JOB_ID)
        await wait_for(lambda: w.checker.progress() is not None, message="first sweep running")
        await wait_for(lambda: any(r.getMessage().startswith("repeat fire skipped")
                                   for r in caplog.records),
                       timeout=5, message="a fire while the sweep runs")
        [first] = await runs()
        assert first["state"] == "active"
        assert len(providers.requests) == 1  # no second sweep probing meanwhile

        async def second_run() -> bool:
            return len(await runs()) >= 2

        await wait_for(second_run, timeout=8, message="the next fire after the sweep ended")
        done, *_ = await runs()
        assert done["state"] == "completed" and done["result"]["failing"] == 1
        await w.daemon.engine.remove_repeat(QUEUE, SWEEP_JOB_ID)


async def test_stopping_the_daemon_ends_a_spread_sweep_at_once(w: World) -> None:
    ids = [f"{n:024x}" for n in range(30, 60)]
    early = [i for i in ids if offset_fraction(i) < 0.01]
    assert not early  # nobody is due in the first 0.6 s of the minute below
    for iid in ids:
        await w.integration("google", integration_id=iid, refresh=False)
    added = await w.daemon.engine.add(QUEUE, {"spread": True, "every": 75},
                                      job_id=SWEEP_JOB_ID)
    await wait_for(lambda: w.checker.progress() is not None, message="spread sweep running")
    started = time.monotonic()
    await w.daemon.stop()
    assert time.monotonic() - started < 3  # not the 5 s shutdown timeout, nor the minute
    run = await w.mongo.call(lambda db: db[RUNS].find_one({"_id": ObjectId(added.run_id)}))
    assert run["state"] == "completed"
    assert run["result"]["interrupted"] is True and run["result"]["checked"] < len(ids)
    assert w.api.requests == []


async def test_the_default_schedule_is_registered(w: World) -> None:
    async def scheduled() -> bool:
        return bool(await w.daemon.engine.scheduler.repeats(QUEUE))

    await wait_for(scheduled, message="the health-check repeat")
    [repeat] = await w.daemon.engine.scheduler.repeats(QUEUE)
    assert (repeat.job_id, repeat.schedule, repeat.timezone) == (SWEEP_JOB_ID, "0 */4 * * *",
                                                                 "UTC")
    assert repeat.data == {"spread": True, "cron": "0 */4 * * *", "timezone": "UTC"}
    timeout = w.daemon.registry.get(QUEUE).options.timeout
    assert timeout == 6 * 3600  # 1.5 x the 4-hour gap: a spread sweep is never cut short


# -- the HTTP API -----------------------------------------------------------------------------


@pytest.fixture
async def api(mongo: Mongo, oauth: OAuthServer,
              providers: ProviderServer) -> AsyncIterator[World]:
    async with JwksServer() as idp, world(mongo, oauth, providers, idp) as it:
        yield it


async def test_check_now_is_admin_only_audited_and_unspread(
        api: World, caplog: pytest.LogCaptureFixture) -> None:
    await api.integration("google")
    assert (await api.http("POST", "/api/v1/integrations/health/check", who=None))[0] == 401
    status, body = await api.http("POST", "/api/v1/integrations/health/check", who=OWNER_A)
    assert (status, body["error"]["code"]) == (403, "auth/forbidden")
    with caplog.at_level(logging.WARNING, logger="mwapjobs.audit"):
        status, body = await api.http("POST", "/api/v1/integrations/health/check")
    assert status == 202 and body["data"]["created"] is True
    run_id = body["data"]["runId"]
    run = await api.daemon.engine.wait_settled(run_id, 10)
    assert run["state"] == "completed" and run["result"]["healthy"] == 1
    assert run["result"]["window"] == 0.0 and run["data"]["requestedBy"] == "token:ops"
    events = [getattr(r, "audit_event", None) for r in caplog.records]
    assert any(e and e["action"] == "integration.health.check" and e["actor"] == "token:ops"
               and e["runId"] == run_id for e in events)


async def test_check_now_hurries_a_spread_sweep_running_here(api: World) -> None:
    for _ in range(3):
        await api.integration("google", refresh=False)
    # A scheduled sweep of a one-minute interval: its probes spread over 48 s.
    added = await api.daemon.engine.add(QUEUE, {"spread": True, "every": 60},
                                        job_id=SWEEP_JOB_ID)
    await wait_for(lambda: api.checker.progress() is not None, message="spread sweep running")
    progress = api.checker.progress()
    assert progress is not None and progress["window"] > 40
    status, body = await api.http("POST", "/api/v1/integrations/health/check")
    assert status == 202
    assert body["data"] == {"runId": added.run_id, "state": "active", "created": False,
                            "hurried": True}
    run = await added.settled(5)
    assert run["state"] == "completed"
    assert run["result"]["hurried"] is True and run["result"]["healthy"] == 3


async def test_check_now_replaces_a_waiting_sweep_and_refuses_one_running_elsewhere(
        api: World) -> None:
    await api.integration("google", refresh=False)
    engine = api.daemon.engine
    await engine.set_paused(QUEUE, True)
    health = api.checker.settings
    waiting = await engine.add(QUEUE, {"spread": True, "cron": health.cron,
                                       "timezone": health.timezone}, job_id=SWEEP_JOB_ID)
    status, body = await api.http("POST", "/api/v1/integrations/health/check")
    assert status == 202
    assert body["data"] == {"runId": waiting.run_id, "state": "waiting", "created": False,
                            "hurried": False}
    run = await api.daemon.operations.get_run(waiting.run_id)
    assert run["data"]["spread"] is False  # the waiting scheduled sweep became "now"
    # The same run, claimed by another instance: nothing to hurry here.
    await api.mongo.call(lambda db: db[RUNS].update_one(
        {"_id": ObjectId(waiting.run_id)}, {"$set": {"state": "active", "leaseOwner": "other"}}))
    status, body = await api.http("POST", "/api/v1/integrations/health/check")
    assert (status, body["error"]["code"]) == (409, "health/sweep-running")
    await api.mongo.call(lambda db: db[RUNS].delete_one({"_id": ObjectId(waiting.run_id)}))
    await engine.set_paused(QUEUE, False)


async def test_health_summary_puts_failing_integrations_first(api: World) -> None:
    healthy, _ = await api.integration("google")
    failing, failing_token = await api.integration("dropbox")
    denied, denied_token = await api.integration("microsoft")
    await api.integration("generic", access_token=None)  # never connected: not listed
    api.api.reply(failing_token, Reply.error(500))
    api.api.reply(denied_token, Reply.forbidden())
    await api.sweep()
    await api.sweep()
    assert (await api.http("GET", "/api/v1/integrations/health", who=OWNER_A))[0] == 403
    status, body = await api.http("GET", "/api/v1/integrations/health?pageSize=2")
    assert status == 200
    data = body["data"]
    assert (data["total"], data["connected"]) == (3, 3)
    assert data["byStatus"] == {"active": 2, "expired": 1, "revoked": 0, "error": 0}
    assert data["byHealth"]["healthy"] == 1 and data["byHealth"]["failing"] == 1
    assert data["byHealth"]["expired"] == 1
    kinds = {p["kind"]: p for p in data["byProvider"]}
    assert kinds["dropbox"]["byHealth"]["failing"] == 1 and kinds["google"]["total"] == 1
    assert [i["integrationId"] for i in data["items"]] == [failing, denied]
    assert data["items"][0]["consecutiveFailures"] == 2
    status, body = await api.http("GET", "/api/v1/integrations/health?page=2&pageSize=2")
    assert [i["integrationId"] for i in body["data"]["items"]] == [healthy]
    assert body["data"]["sweep"]["last"]["healthy"] == 1
    assert body["data"]["sweep"]["schedule"]["cron"] == "0 */4 * * *"


async def test_integration_health_follows_the_refresh_endpoint_rules(api: World) -> None:
    mine, token = await api.integration("google")
    theirs, _ = await api.integration("google", tenant=api.tenant_b)
    await insert_superadmin(api.mongo, "auth0|root")
    api.api.script(token, Reply.error(503))
    await api.sweep()
    await api.sweep()
    path = "/api/v1/tenants/{t}/integrations/{i}/health"
    for who in (OWNER_A, "auth0|root", "admin"):
        status, body = await api.http("GET", path.format(t=api.tenant_a, i=mine), who=who)
        assert status == 200, (who, body)
        data = body["data"]
        assert (data["integrationId"], data["status"], data["provider"]["kind"]) == (
            mine, "active", "google")
        assert [h["outcome"] for h in data["history"]] == ["healthy", "failing"]  # newest first
        assert data["history"][1]["httpStatus"] == 503
        assert data["health"]["outcome"] == "healthy"
        assert "accessToken" not in json.dumps(body) and token not in json.dumps(body)
    status, _ = await api.http("GET", path.format(t=api.tenant_b, i=mine), who=OWNER_A)
    assert status == 403  # not the owner of tenant B
    status, body = await api.http("GET", path.format(t=api.tenant_b, i=mine), who=OWNER_B)
    assert (status, body["error"]["code"]) == (404, "integration/not-found")
    status, _ = await api.http("GET", path.format(t=api.tenant_a, i=theirs), who=OWNER_A)
    assert status == 404
    status, _ = await api.http("GET", path.format(t=api.tenant_a, i="f" * 24), who="admin")
    assert status == 404
    assert (await api.http("GET", path.format(t=api.tenant_a, i=mine), who=None))[0] == 401
    assert (await api.http("GET", path.format(t=api.tenant_a, i="bad$id")))[0] == 400


async def test_token_refresh_disabled_makes_a_401_a_plain_failure(
        mongo: Mongo, oauth: OAuthServer, providers: ProviderServer) -> None:
    settings = make_settings(refresh={"enabled": False}, health={"request_timeout": 0.5})
    provider = await insert_provider(mongo, test_cipher(), token_url=oauth.token_url,
                                     client_id=CID, client_secret=SECRET,
                                     metadata=providers.metadata("google"))
    iid = await insert_integration(mongo, test_cipher(), provider=provider, tenant_id="t1",
                                   access_token="at-stale", expires_in=timedelta(hours=1)
                                   .total_seconds())
    providers.reply("at-stale", Reply.unauthorized())
    daemon = Daemon(settings, mongo=mongo)
    await daemon.start()
    try:
        await daemon.wait_ready()
        assert daemon.jobs["refresh"] is None and daemon.jobs["health"] is not None
        report = await daemon.jobs["health"].sweep()
        assert report.failing == 1
        state = await integration_state(mongo, iid)
        assert state is not None
        assert "token refresh is disabled" in state["health"]["lastResult"]["message"]
    finally:
        await daemon.stop()
