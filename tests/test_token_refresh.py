"""Token refresh (RFC 6749 §6) against a real Authlib token endpoint.

Two levels:
- the handler alone (`TokenRefresher(job)`): the exact request, the exact
  write-back, and how each answer is classified;
- the whole daemon on the embedded store: retries with backoff bounded by the
  token's expiry, permanent failures, races with the backend, revoked
  integrations and the per-provider limits.

The MWAP documents are seeded as the backend writes them (tests/support/mwap_data.py):
tokens and client secrets encrypted with MwapCipher, except where a case is
about plaintext values written by the backend's PATCH.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus

import aiohttp
import pytest

from mwapjobs.alerts import AlertManager
from mwapjobs.alerts.rules import Rule
from mwapjobs.config import RefreshSettings, Settings
from mwapjobs.crypto import MwapCipher
from mwapjobs.daemon import Daemon
from mwapjobs.jobs.refresh.handler import RefreshFailed, TokenRefresher
from mwapjobs.jobs.refresh.rules import provider_on_hold
from mwapjobs.jobs.refresh.runs import QUEUE, fingerprint, job_id
from mwapjobs.outbound import UrlPolicy
from mwapjobs.queues import Job, Postpone, TransientError
from mwapjobs.storage.integrations import IntegrationStore
from mwapjobs.storage.mongo import Mongo
from mwapjobs.storage.names import PROVIDERS
from mwapjobs.storage.providers import ProviderHolds, config_fingerprint
from tests.conftest import make_settings, wait_for
from tests.support.mwap_data import (
    ABSENT,
    SeededProvider,
    as_utc,
    get_integration,
    insert_integration,
    insert_provider,
    integration_state,
    new_hex_id,
    notifications,
    pending_refresh_runs,
    refresh_runs,
    test_cipher,
    update_integration,
    utcnow,
)
from tests.support.oauth_server import Fault, Hang, OAuthServer

CID, SECRET = "mwap-client", "s3cret-value"
UA = "MWAP-OAuth-Client/1.0"
FORM = "application/x-www-form-urlencoded"
MS = timedelta(milliseconds=1)  # BSON dates keep milliseconds

LOCAL = UrlPolicy(allow_loopback=True)  # the token server listens on 127.0.0.1


# -- the token endpoint, with a meter of requests in flight -------------------------------


class InFlightMeter:
    """WSGI middleware counting requests in flight at the server, per client id."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.current: dict[str, int] = {}
        self.peak: dict[str, int] = {}

    def reset(self) -> None:
        with self.lock:
            self.current.clear()
            self.peak.clear()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        client = _client_of(environ.get("HTTP_AUTHORIZATION", ""))
        with self.lock:
            self.current[client] = self.current.get(client, 0) + 1
            self.peak[client] = max(self.peak.get(client, 0), self.current[client])
        try:
            return list(self.app(environ, start_response))
        finally:
            with self.lock:
                self.current[client] -= 1


def _client_of(header: str) -> str:
    try:
        return base64.b64decode(header.split(" ", 1)[1]).decode().split(":", 1)[0]
    except (IndexError, ValueError):
        return "?"


@pytest.fixture(scope="module")
def oauth_server() -> Iterator[OAuthServer]:
    with OAuthServer() as server:
        app = server._app  # the Flask app: wrap its WSGI callable, the usual middleware hook
        app.wsgi_app = InFlightMeter(app.wsgi_app)  # type: ignore[method-assign]
        yield server


@pytest.fixture
def oauth(oauth_server: OAuthServer) -> Iterator[OAuthServer]:
    oauth_server.reset()
    meter(oauth_server).reset()
    yield oauth_server
    oauth_server.reset()  # wakes any handler still hanging


def meter(server: OAuthServer) -> InFlightMeter:
    wrapped = server._app.wsgi_app
    assert isinstance(wrapped, InFlightMeter)
    return wrapped


# -- seeding --------------------------------------------------------------------------------


@dataclass
class World:
    oauth: OAuthServer
    mongo: Mongo
    cipher: MwapCipher = field(default_factory=test_cipher)
    tenant_id: str = field(default_factory=new_hex_id)

    async def provider(self, client_id: str = CID, secret: str = SECRET, *,
                       auth_methods: tuple[str, ...] = ("client_secret_basic",),
                       rotate: bool = False, return_refresh_token: bool = True,
                       expires_in: int | None = 3600, scope: str = "files.read files.write",
                       answer_format: str = "json", errors_with_200: bool = False,
                       **options: Any) -> SeededProvider:
        """A client at the token endpoint and its `cloudProviders` document."""
        self.oauth.add_client(client_id, secret, auth_methods=auth_methods,
                              rotate_refresh_token=rotate,
                              return_refresh_token=return_refresh_token,
                              expires_in=expires_in, scope=scope,
                              answer_format=answer_format, errors_with_200=errors_with_200)
        return await insert_provider(self.mongo, self.cipher, token_url=self.oauth.token_url,
                                     client_id=client_id, client_secret=secret, **options)

    async def integration(self, provider: SeededProvider, *, expires_in: float = 30.0,
                          refresh_token: str | None = None,
                          **options: Any) -> tuple[str, str]:
        """An integration holding a refresh token the server accepts; (id, refresh token)."""
        rt = refresh_token or self.oauth.issue_refresh_token(provider.client_id)
        options.setdefault("tenant_id", self.tenant_id)
        iid = await insert_integration(self.mongo, self.cipher, provider=provider,
                                       refresh_token=rt, access_token="at-before",
                                       expires_in=expires_in, **options)
        return iid, rt

    async def doc(self, iid: Any) -> dict[str, Any]:
        doc = await get_integration(self.mongo, iid)
        assert doc is not None
        return doc


@pytest.fixture
def world(oauth: OAuthServer, mongo: Mongo) -> World:
    return World(oauth, mongo)


def token_requests(server: OAuthServer) -> list[Any]:
    return [r for r in server.requests if r.path == "/oauth/token"]


# -- the handler alone --------------------------------------------------------------------------


def job_for(integration_id: str, attempt: int = 1) -> Job:
    return Job(run_id=new_hex_id(), queue=QUEUE, job_id=job_id(integration_id),
               data={"integrationId": integration_id}, attempt=attempt, max_attempts=3,
               created_at=utcnow(), deadline=None)


async def refresh_once(world: World, iid: str, **settings: Any) -> Any:
    """Run the refresh handler once, as the engine would, and return its result."""
    async with aiohttp.ClientSession() as http:
        refresher = TokenRefresher(IntegrationStore(world.mongo), world.cipher, http,
                                   RefreshSettings(**settings), utcnow, policy=LOCAL)
        return await refresher(job_for(iid))


def issued(server: OAuthServer) -> dict[str, Any]:
    """What the server answered to the last token request."""
    body = token_requests(server)[-1].response_json
    assert isinstance(body, dict)
    return body


def changed_fields(before: dict[str, Any], after: dict[str, Any]) -> set[str]:
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


def close_to(stored: datetime, low: datetime, high: datetime) -> bool:
    return low - MS <= as_utc(stored) <= high + MS


async def test_request_is_a_form_post_with_basic_credentials_and_mwap_user_agent(
        world: World) -> None:
    provider = await world.provider()
    iid, rt = await world.integration(provider)

    await refresh_once(world, iid)

    [req] = token_requests(world.oauth)
    assert req.method == "POST"
    assert req.headers["Content-Type"].startswith(FORM)
    assert req.headers["User-Agent"] == UA
    assert req.form == {"grant_type": "refresh_token", "refresh_token": rt}  # decrypted
    assert req.basic_auth == (CID, SECRET)  # decrypted secret
    assert (req.client_id, req.auth_method, req.status) == (CID, "client_secret_basic", 200)


async def test_client_secret_post_when_the_provider_asks_for_it(world: World) -> None:
    provider = await world.provider(auth_methods=("client_secret_post",),
                                    metadata={"tokenEndpointAuthMethod": "client_secret_post"})
    iid, rt = await world.integration(provider)

    result = await refresh_once(world, iid)

    [req] = token_requests(world.oauth)
    assert "Authorization" not in req.headers and req.basic_auth is None
    assert req.form == {"grant_type": "refresh_token", "refresh_token": rt,
                        "client_id": CID, "client_secret": SECRET}
    assert (req.auth_method, req.status) == ("client_secret_post", 200)
    assert "expiresAt" in result


@pytest.mark.parametrize("secret", ["s3c%2Fr+e/t", "s3c%r+e/t%", "a b:c&d=é"])
async def test_basic_credentials_are_form_urlencoded_per_rfc6749(world: World,
                                                                  secret: str) -> None:
    provider = await world.provider(client_id="id:with/colon", secret=secret)
    iid, _ = await world.integration(provider)

    await refresh_once(world, iid)

    [req] = token_requests(world.oauth)
    assert req.basic_auth == (quote("id:with/colon", safe=""), quote(secret, safe=""))
    assert req.status == 200, req.response_text
    assert world.cipher.decrypt((await world.doc(iid))["accessToken"]) == issued(
        world.oauth)["access_token"]


@pytest.mark.parametrize(("token_method", "expected"),
                         [(None, "POST"), ("POST", "POST"), ("put", "PUT")])
async def test_token_method_is_honoured(world: World, token_method: str | None,
                                        expected: str) -> None:
    options = {} if token_method is None else {"token_method": token_method}
    provider = await world.provider(**options)
    iid, rt = await world.integration(provider)
    if expected != "POST":  # Authlib only speaks POST: answer for it
        world.oauth.script(Fault(200, {"access_token": "at-put", "expires_in": 120}))

    await refresh_once(world, iid)

    [req] = token_requests(world.oauth)
    assert req.method == expected
    assert req.form == {"grant_type": "refresh_token", "refresh_token": rt}
    assert (await world.doc(iid))["status"] == "active"


async def test_rotated_tokens_are_written_back_encrypted_and_nothing_else_changes(
        world: World) -> None:
    provider = await world.provider(rotate=True)  # Microsoft-like
    iid, rt = await world.integration(provider, status="expired", scopesGranted=["old"],
                                      oauth={"state": "pkce-state", "codeVerifier": "v"})
    before = await world.doc(iid)
    t0 = utcnow()

    result = await refresh_once(world, iid)

    t1 = utcnow()
    after = await world.doc(iid)
    answer = issued(world.oauth)
    assert answer["refresh_token"] != rt
    assert changed_fields(before, after) == {"accessToken", "refreshToken", "tokenExpiresAt",
                                             "status", "updatedAt", "scopesGranted"}
    for name, value in (("accessToken", answer["access_token"]),
                        ("refreshToken", answer["refresh_token"])):
        assert MwapCipher.looks_encrypted(after[name]), name
        assert world.cipher.decrypt(after[name]) == value, name
    assert close_to(after["tokenExpiresAt"], t0 + timedelta(seconds=3600),
                    t1 + timedelta(seconds=3600))
    assert close_to(after["updatedAt"], t0, t1)
    assert after["status"] == "active"
    assert after["scopesGranted"] == ["files.read", "files.write"]
    assert result["rotated"] is True
    assert not world.oauth.is_active(rt) and world.oauth.is_active(answer["refresh_token"])


async def test_no_refresh_token_returned_keeps_the_old_one_and_defaults_expiry(
        world: World) -> None:
    provider = await world.provider(return_refresh_token=False, expires_in=None, scope="")
    iid, rt = await world.integration(provider, scopesGranted=["kept"])  # Dropbox-like
    before = await world.doc(iid)
    t0 = utcnow()

    result = await refresh_once(world, iid)

    t1 = utcnow()
    after = await world.doc(iid)
    assert "refresh_token" not in issued(world.oauth) and "expires_in" not in issued(world.oauth)
    assert after["refreshToken"] == before["refreshToken"]
    assert world.cipher.decrypt(after["refreshToken"]) == rt
    assert world.cipher.decrypt(after["accessToken"]) == issued(world.oauth)["access_token"]
    assert close_to(after["tokenExpiresAt"], t0 + timedelta(seconds=3600),
                    t1 + timedelta(seconds=3600))
    assert after["scopesGranted"] == ["kept"]  # no scope in the answer: left alone
    assert result["rotated"] is False


async def test_expires_in_from_the_answer_sets_the_new_expiry(world: World) -> None:
    provider = await world.provider(expires_in=90)
    iid, _ = await world.integration(provider)
    t0 = utcnow()
    await refresh_once(world, iid)
    t1 = utcnow()
    after = await world.doc(iid)
    assert close_to(after["tokenExpiresAt"], t0 + timedelta(seconds=90),
                    t1 + timedelta(seconds=90))


async def test_plaintext_secret_and_tokens_from_the_backend_patch(world: World) -> None:
    provider = await world.provider(rotate=True, encrypt_secret=False)
    iid, rt = await world.integration(provider, encrypt=False)
    assert (await world.doc(iid))["refreshToken"] == rt  # stored as plaintext

    await refresh_once(world, iid)

    [req] = token_requests(world.oauth)
    assert (req.basic_auth, req.form["refresh_token"], req.status) == ((CID, SECRET), rt, 200)
    after = await world.doc(iid)
    assert world.cipher.decrypt(after["accessToken"]) == issued(world.oauth)["access_token"]
    assert world.cipher.decrypt(after["refreshToken"]) == issued(world.oauth)["refresh_token"]


async def test_a_kept_plaintext_refresh_token_is_stored_encrypted(world: World) -> None:
    provider = await world.provider(return_refresh_token=False)
    iid, rt = await world.integration(provider, encrypt=False)

    await refresh_once(world, iid)

    after = await world.doc(iid)
    assert MwapCipher.looks_encrypted(after["refreshToken"])
    assert world.cipher.decrypt(after["refreshToken"]) == rt


async def test_an_integration_with_an_objectid_id_is_refreshed(world: World) -> None:
    from bson import ObjectId

    provider = await world.provider()
    oid = ObjectId()
    await world.integration(provider, integration_id=oid)

    await refresh_once(world, str(oid))

    assert world.cipher.decrypt((await world.doc(oid))["accessToken"]) == issued(
        world.oauth)["access_token"]


async def test_a_token_that_does_not_decrypt_is_not_sent_and_expires_nothing(
        world: World) -> None:
    provider = await world.provider()
    iid, _ = await world.integration(provider)
    stored = (await world.doc(iid))["refreshToken"]
    wrong_key = MwapCipher("not-the-backend-encryption-key!!")
    async with aiohttp.ClientSession() as http:
        refresher = TokenRefresher(IntegrationStore(world.mongo), wrong_key, http,
                                   RefreshSettings(), utcnow, policy=LOCAL)
        with contextlib.suppress(Exception):
            await refresher(job_for(iid))
    assert [r.form.get("refresh_token") for r in token_requests(world.oauth)
            if r.form.get("refresh_token") == stored] == []
    assert (await world.doc(iid))["status"] == "active"
    assert await notifications(world.mongo, iid) == []


@pytest.mark.parametrize("case", ["missing", "revoked", "null-token", "no-token"])
async def test_nothing_to_refresh_sends_no_request(world: World, case: str) -> None:
    provider = await world.provider()
    if case == "missing":
        iid = new_hex_id()
    elif case == "revoked":
        iid, _ = await world.integration(provider, status="revoked")
    else:
        iid = await insert_integration(
            world.mongo, world.cipher, provider=provider, tenant_id=world.tenant_id,
            refresh_token=None if case == "null-token" else ABSENT, expires_in=30)
    before = await get_integration(world.mongo, iid)

    result = await refresh_once(world, iid)

    assert "skipped" in result
    assert token_requests(world.oauth) == []
    assert await get_integration(world.mongo, iid) == before


# -- how answers are classified ------------------------------------------------------------------


async def _assert_given_up(world: World, iid: str, before: dict[str, Any], reason: str) -> None:
    """A permanent failure: expired (so the tenant can reconnect), reason kept in our own
    collection, a notification, and nothing else written to the backend's document."""
    after = await world.doc(iid)
    assert after["status"] == "expired"
    assert changed_fields(before, after) == {"status", "updatedAt"}
    state = await integration_state(world.mongo, iid)
    assert state is not None
    failure = state["refreshFailure"]
    assert reason in failure["reason"]
    assert failure["token"] == fingerprint(before["refreshToken"])
    [note] = await notifications(world.mongo, iid)
    assert (note["kind"], note["tenantId"], note["providerId"]) == (
        "integration.expired", world.tenant_id, before["providerId"])
    assert reason in note["reason"] and note["delivered"] is False


@pytest.mark.parametrize("case", ["invalid_grant", "json_200_invalid_grant",
                                  "github_bad_refresh_token", "form_invalid_grant"])
async def test_only_a_dead_grant_expires_the_integration(world: World, case: str) -> None:
    form_client = case in ("github_bad_refresh_token", "form_invalid_grant")
    provider = await world.provider(answer_format="form" if form_client else "json",
                                    errors_with_200=form_client)
    iid, rt = await world.integration(provider)
    expected = "invalid_grant"
    if case in ("invalid_grant", "form_invalid_grant"):
        world.oauth.revoke(rt)  # Authlib's own answer (as a 200 form for the GitHub-like one)
    elif case == "json_200_invalid_grant":  # a 200 whose body is an OAuth error
        world.oauth.script(Fault(200, {"error": "invalid_grant",
                                       "error_description": "Token has been expired or revoked."}))
    else:
        world.oauth.script(Fault(200, "error=bad_refresh_token&error_description=The+refresh+"
                                      "token+passed+is+incorrect+or+expired.",
                                 {"Content-Type": FORM}))
        expected = "bad_refresh_token: The refresh token passed is incorrect or expired."
    before = await world.doc(iid)

    with pytest.raises(RefreshFailed):
        await refresh_once(world, iid)

    assert len(token_requests(world.oauth)) == 1
    await _assert_given_up(world, iid, before, expected)
    assert await hold_of(world, provider) is None


async def hold_of(world: World, provider: SeededProvider) -> dict[str, Any] | None:
    state = await ProviderHolds(world.mongo).state(provider.hex)
    return state.get("hold") if state else None


@pytest.fixture(scope="module")
def tls_server() -> Iterator[OAuthServer]:
    with OAuthServer(tls=True) as server:
        yield server


PROVIDER_ERRORS = ["wrong_secret", "post_only_client", "unauthorized_client",
                   "unsupported_grant_type", "bare_401", "form_200_invalid_client",
                   "token_url_404", "token_url_405", "forbidden_403", "redirect", "tls",
                   "not_a_url"]


@pytest.mark.parametrize("case", PROVIDER_ERRORS)
async def test_a_provider_configuration_error_holds_the_provider_not_the_tenant(
        world: World, tls_server: OAuthServer, case: str) -> None:
    options: dict[str, Any] = {}
    if case == "post_only_client":  # we send Basic; the client may only use POST
        options["auth_methods"] = ("client_secret_post",)
    if case == "form_200_invalid_client":
        options |= {"answer_format": "form", "errors_with_200": True}
    if case == "token_url_404":
        options["tokenUrl"] = f"{world.oauth.url}/oauth/v2/token"
    if case == "token_url_405":
        options["tokenUrl"] = world.oauth.authorize_url  # the authUrl pasted as tokenUrl
    if case == "tls":
        options["tokenUrl"] = tls_server.token_url  # a certificate nobody trusts
    if case == "not_a_url":
        options["tokenUrl"] = "oauth2.example.com/token"
    provider = await world.provider(**options)
    iid, rt = await world.integration(provider)
    expected = {"wrong_secret": "invalid_client", "post_only_client": "invalid_client",
                "unauthorized_client": "unauthorized_client",
                "unsupported_grant_type": "unsupported_grant_type", "bare_401": "HTTP 401",
                "form_200_invalid_client": "invalid_client", "token_url_404": "HTTP 404",
                "token_url_405": "HTTP 405", "forbidden_403": "HTTP 403",
                "redirect": "HTTP 302", "tls": "tls", "not_a_url": "tokenUrl refused"}[case]
    if case in ("wrong_secret", "form_200_invalid_client"):
        world.oauth.add_client(CID, "rotated-secret", **{
            k: v for k, v in options.items() if k in ("answer_format", "errors_with_200")})
    elif case in ("unauthorized_client", "unsupported_grant_type"):
        world.oauth.script(Fault(400, {"error": case}))
    elif case == "bare_401":
        world.oauth.script(Fault(401, "Unauthorized"))
    elif case == "forbidden_403":
        world.oauth.script(Fault(403, "<html>Forbidden</html>", {"Content-Type": "text/html"}))
    elif case == "redirect":
        world.oauth.script(Fault(302, "", {"Location": "https://login.example.com/token"}))
    before = await world.doc(iid)

    with pytest.raises(Postpone) as raised:
        await refresh_once(world, iid)

    assert 0 < raised.value.delay <= RefreshSettings().provider_hold_recheck
    assert await world.doc(iid) == before  # no status change, nothing written
    assert await notifications(world.mongo, iid) == []
    assert await integration_state(world.mongo, iid) is None  # the token is not condemned
    assert world.oauth.is_active(rt)
    hold = await hold_of(world, provider)
    assert hold is not None and hold["error"] == expected, hold
    assert hold["config"] == config_fingerprint(await provider_doc_of(world, provider))
    assert expected in str(raised.value)

    # the next refresh of that provider waits without asking it
    sent = len(world.oauth.requests) + len(tls_server.requests)
    iid2, _ = await world.integration(provider)
    with pytest.raises(Postpone):
        await refresh_once(world, iid2)
    assert len(world.oauth.requests) + len(tls_server.requests) == sent


async def provider_doc_of(world: World, provider: SeededProvider) -> dict[str, Any]:
    doc = await IntegrationStore(world.mongo).provider(provider.hex)
    assert doc is not None
    return doc


@pytest.mark.parametrize("fault", [
    Fault(400, {"error": "invalid_request", "error_description": "bad thing"}),
    Fault(400, {"error": "invalid_scope"}),
    Fault(400, "Bad Request"),
    Fault(403, {"error": "access_denied"}),
    Fault(200, {"error": "temporarily_unavailable"}),
], ids=["invalid_request", "invalid_scope", "400-no-code", "403-with-code", "200-with-error"])
async def test_other_refusals_are_retried_and_condemn_nothing(world: World,
                                                              fault: Fault) -> None:
    provider = await world.provider()
    iid, _ = await world.integration(provider)
    world.oauth.script(fault)
    before = await world.doc(iid)

    with pytest.raises(TransientError, match="provider refused the refresh"):
        await refresh_once(world, iid)

    assert await world.doc(iid) == before
    assert await integration_state(world.mongo, iid) is None
    assert await notifications(world.mongo, iid) == []
    assert await hold_of(world, provider) is None


async def test_a_form_encoded_answer_is_read_like_json(world: World) -> None:
    provider = await world.provider(rotate=True, expires_in=120, answer_format="form")
    iid, rt = await world.integration(provider)
    t0 = utcnow()

    result = await refresh_once(world, iid)

    t1 = utcnow()
    [req] = token_requests(world.oauth)
    assert req.status == 200 and req.response_text is not None
    assert req.response_text.startswith("access_token=")  # GitHub-style, not JSON
    answer = dict(parse_qsl(req.response_text))
    after = await world.doc(iid)
    assert world.cipher.decrypt(after["accessToken"]) == answer["access_token"]
    assert world.cipher.decrypt(after["refreshToken"]) == answer["refresh_token"] != rt
    assert close_to(after["tokenExpiresAt"], t0 + timedelta(seconds=120),
                    t1 + timedelta(seconds=120))
    assert after["scopesGranted"] == ["files.read", "files.write"]
    assert result["rotated"] is True


@pytest.mark.parametrize("auth", ["client_secret_basic", "client_secret_post"])
async def test_error_descriptions_never_carry_what_was_sent(
        world: World, auth: str, caplog: pytest.LogCaptureFixture) -> None:
    secret = "s3c/r+e t%&x"  # differs in every encoding
    provider = await world.provider(
        secret=secret, auth_methods=(auth,),
        metadata={"providerType": "test", "tokenEndpointAuthMethod": auth})
    iid, rt = await world.integration(provider)
    world.oauth.echo_credentials = True  # error_description = everything we sent
    world.oauth.revoke(rt)

    with pytest.raises(RefreshFailed) as refused:
        await refresh_once(world, iid)

    answer = token_requests(world.oauth)[-1].response_json
    assert rt in answer["error_description"]  # the server did echo them
    basic = base64.b64encode(f"{quote(CID, safe='')}:{quote(secret, safe='')}".encode()).decode()
    leaks = {rt, secret, CID, quote(secret, safe=""), quote_plus(secret), basic}
    if auth == "client_secret_basic":
        assert basic in answer["error_description"]
    state = await integration_state(world.mongo, iid)
    [note] = await notifications(world.mongo, iid)
    stored = [str(refused.value), state["refreshFailure"]["reason"] if state else "",
              note["reason"], caplog.text]
    assert "invalid_grant" in str(refused.value) and "[redacted]" in str(refused.value)

    # the same request refused for the client: the hold's reason is scrubbed too
    world.oauth.add_client(CID, "another-secret", auth_methods=(auth,))
    iid2, _ = await world.integration(provider, refresh_token=world.oauth.issue_refresh_token(CID))
    with pytest.raises(Postpone) as held:
        await refresh_once(world, iid2)
    hold = await hold_of(world, provider)
    assert hold is not None and hold["error"] == "invalid_client"
    stored += [str(held.value), hold["reason"]]
    for text in stored:
        for value in leaks:
            assert value not in text, (value, text)


async def test_an_error_description_is_cut_to_300_characters(world: World) -> None:
    provider = await world.provider()
    iid, _ = await world.integration(provider)
    world.oauth.script(Fault(400, {"error": "invalid_grant", "error_description": "x" * 5000}))
    with pytest.raises(RefreshFailed) as raised:
        await refresh_once(world, iid)
    assert "x" * 299 in str(raised.value) and "x" * 301 not in str(raised.value)
    assert len(str(raised.value)) < 400


@pytest.mark.parametrize(("fault", "retry_after"), [
    (Fault(500, {"error": "server_error"}), None),
    (Fault(503, "down"), None),
    (Fault(429, {"error": "slow_down"}, {"Retry-After": "7"}), 7.0),
    (Fault(429, "", {"Retry-After": "soon"}), None),
    (Fault(200, "<html>not json</html>"), None),
    (Fault(200, {"token_type": "Bearer"}), None),  # no access_token
], ids=["500", "503", "429-seconds", "429-garbage", "200-not-json", "200-no-token"])
async def test_transient_answers_raise_transient_errors(world: World, fault: Fault,
                                                        retry_after: float | None) -> None:
    provider = await world.provider()
    iid, _ = await world.integration(provider)
    world.oauth.script(fault)
    before = await world.doc(iid)

    with pytest.raises(TransientError) as raised:
        await refresh_once(world, iid)

    assert raised.value.retry_after == retry_after
    assert await world.doc(iid) == before
    assert await integration_state(world.mongo, iid) is None


async def test_retry_after_as_an_http_date(world: World) -> None:
    provider = await world.provider()
    iid, _ = await world.integration(provider)
    when = format_datetime(utcnow() + timedelta(seconds=4), usegmt=True)
    world.oauth.script(Fault(429, "", {"Retry-After": when}))
    with pytest.raises(TransientError) as raised:
        await refresh_once(world, iid)
    assert raised.value.retry_after is not None and 2.0 <= raised.value.retry_after <= 4.0


async def test_a_timeout_is_transient(world: World) -> None:
    provider = await world.provider(rotate=True)
    iid, rt = await world.integration(provider)
    world.oauth.script(Hang(30))
    started = time.monotonic()
    with pytest.raises(TransientError, match="timed out"):
        await refresh_once(world, iid, request_timeout=0.3)
    assert time.monotonic() - started < 5
    assert world.oauth.is_active(rt)


async def test_an_unreachable_endpoint_is_transient(world: World) -> None:
    provider = await world.provider(tokenUrl="http://127.0.0.1:9/oauth/token")
    iid, _ = await world.integration(provider)
    with pytest.raises(TransientError, match="unreachable"):
        await refresh_once(world, iid)


# -- the whole daemon ---------------------------------------------------------------------------


def daemon_settings(queue: dict[str, Any] | None = None, **refresh: Any) -> Settings:
    """Refresh settings for in-process daemons: every seeded token (30 s) is due at once,
    discovery runs at start and then (unless asked) not again, fast backoff."""
    base = {"lead": 60, "jitter": 0, "sync_interval": 3600, "request_timeout": 5,
            "provider_concurrency": 4, "provider_rate": 100}
    return make_settings(
        refresh={**base, **refresh},
        queues={QUEUE: queue or {"backoff": {"delay": 0.1, "jitter": 0}}},
    )


@asynccontextmanager
async def running(mongo: Mongo, settings: Settings) -> AsyncIterator[Daemon]:
    daemon = Daemon(settings, mongo=mongo)
    await daemon.start()
    try:
        await daemon.wait_ready()
        yield daemon
    finally:
        await daemon.stop()


async def finished_run(mongo: Mongo, iid: str, timeout: float = 10.0) -> dict[str, Any]:
    found: list[dict[str, Any]] = []

    async def done() -> bool:
        found[:] = await refresh_runs(mongo, iid, ("completed", "failed"))
        return bool(found)

    await wait_for(done, timeout, message=f"a finished refresh run of {iid}")
    assert len(found) == 1, found
    return found[0]


async def test_a_due_integration_is_refreshed_at_once_by_the_daemon(world: World) -> None:
    provider = await world.provider(rotate=True)
    iid, _ = await world.integration(provider, expires_in=30)  # lead 60: due already
    later, _ = await world.integration(provider, expires_in=3600)
    async with running(world.mongo, daemon_settings()):
        run = await finished_run(world.mongo, iid)
        assert run["state"] == "completed" and run["attemptsMade"] == 1
    after = await world.doc(iid)
    assert world.cipher.decrypt(after["refreshToken"]) == issued(world.oauth)["refresh_token"]
    assert len(token_requests(world.oauth)) == 1
    assert [r["state"] for r in await refresh_runs(world.mongo, later)] == ["delayed"]


async def test_5xx_is_retried_with_exponential_backoff_then_succeeds(world: World) -> None:
    provider = await world.provider(rotate=True)
    iid, rt = await world.integration(provider)
    world.oauth.script(Fault(500, {"error": "server_error"}), Fault(502, "bad gateway"))
    async with running(world.mongo, daemon_settings()):
        run = await finished_run(world.mongo, iid)
    reqs = token_requests(world.oauth)
    assert [r.status for r in reqs] == [500, 502, 200]
    assert all(r.form["refresh_token"] == rt for r in reqs)
    assert reqs[1].monotonic - reqs[0].monotonic >= 0.1  # delay 0.1, then 0.2
    assert reqs[2].monotonic - reqs[1].monotonic >= 0.2
    assert (run["state"], run["attemptsMade"]) == ("completed", 3)
    assert [a["outcome"] for a in run["attempts"]] == ["retrying", "retrying", "completed"]
    after = await world.doc(iid)
    assert world.cipher.decrypt(after["refreshToken"]) == issued(world.oauth)["refresh_token"]


async def test_429_is_retried_no_sooner_than_retry_after(world: World) -> None:
    provider = await world.provider()
    iid, _ = await world.integration(provider)
    world.oauth.script(Fault(429, {"error": "slow_down"}, {"Retry-After": "1"}))
    async with running(world.mongo, daemon_settings()):
        run = await finished_run(world.mongo, iid)
    first, second = token_requests(world.oauth)
    assert (first.status, second.status) == (429, 200)
    assert second.monotonic - first.monotonic >= 1.0
    assert run["state"] == "completed"


async def test_a_hanging_endpoint_times_out_and_is_retried(world: World) -> None:
    provider = await world.provider(rotate=True)
    iid, rt = await world.integration(provider)
    world.oauth.script(Hang(30))  # never answers in time; does not touch the token
    async with running(world.mongo, daemon_settings(request_timeout=0.3)):
        run = await finished_run(world.mongo, iid)
    assert run["state"] == "completed" and run["attemptsMade"] == 2
    assert "timed out" in run["attempts"][0]["error"]["message"]
    reqs = token_requests(world.oauth)
    assert len(reqs) == 2 and reqs[1].monotonic - reqs[0].monotonic >= 0.3
    assert not world.oauth.is_active(rt)  # rotated by the successful retry


async def test_retries_stop_at_the_token_expiry_and_the_integration_is_marked_expired(
        world: World) -> None:
    provider = await world.provider()
    iid, rt = await world.integration(provider, expires_in=5)
    world.oauth.script(Fault(429, {"error": "slow_down"}, {"Retry-After": "30"}))
    async with running(world.mongo, daemon_settings()) as daemon:
        run = await finished_run(world.mongo, iid)
        assert run["state"] == "failed"
        assert run["error"]["deadlineExceeded"] is True and run["attemptsMade"] == 1

        async def expired() -> bool:
            return (await world.doc(iid))["status"] == "expired"

        await wait_for(expired, message="marked expired")
        assert daemon.jobs["refresh"].refresher is not None
    assert len(token_requests(world.oauth)) == 1
    [note] = await notifications(world.mongo, iid)
    assert note["kind"] == "integration.expired"
    assert "expired before a refresh succeeded" in note["reason"]
    # a transient failure does not condemn the refresh token
    assert "refreshFailure" not in (await integration_state(world.mongo, iid) or {})
    assert world.oauth.is_active(rt)


async def test_exponential_backoff_is_bounded_by_the_token_expiry(world: World) -> None:
    provider = await world.provider()
    iid, _ = await world.integration(provider, expires_in=2.5)
    world.oauth.script(*[Fault(500, "down")] * 5)
    settings = daemon_settings(queue={"attempts": 10, "backoff": {"delay": 1.0, "jitter": 0}})
    async with running(world.mongo, settings):
        run = await finished_run(world.mongo, iid)
        # attempt 1 at once, attempt 2 after 1 s; attempt 3 (2 s later) would pass the expiry
        assert run["state"] == "failed" and run["attemptsMade"] == 2
        assert run["error"]["deadlineExceeded"] is True

        async def expired() -> bool:
            return (await world.doc(iid))["status"] == "expired"

        await wait_for(expired, message="marked expired")
    assert len(token_requests(world.oauth)) == 2


async def test_a_follow_up_run_still_honours_retry_after(world: World) -> None:
    provider = await world.provider()
    iid, _ = await world.integration(provider, expires_in=4)
    world.oauth.script(Fault(429, {"error": "slow_down"}, {"Retry-After": "30"}))
    async with running(world.mongo, daemon_settings(sync_interval=0.2)):

        async def settled() -> bool:  # asked again, or given up as it cannot be saved
            return (len(token_requests(world.oauth)) > 1
                    or (await world.doc(iid))["status"] == "expired")

        await wait_for(settled, timeout=10, message="a second request or the expiry marking")
    reqs = token_requests(world.oauth)
    assert len(reqs) == 1, (
        f"asked again {reqs[1].monotonic - reqs[0].monotonic:.1f}s after a 429 with "
        "Retry-After: 30")
    assert (await world.doc(iid))["status"] == "expired"


@pytest.mark.parametrize(("fault", "wait"), [
    (Fault(429, {"error": "slow_down"}, {"Retry-After": "2"}), 2.0),
    (Fault(503, "down"), 1.5),
], ids=["retry-after", "backoff"])
async def test_discovery_does_not_cut_a_retry_short(world: World, fault: Fault,
                                                    wait: float) -> None:
    provider = await world.provider()
    iid, _ = await world.integration(provider)  # due now
    world.oauth.script(fault)
    # discovery passes every 50 ms (full ones every 10) while the retry waits
    settings = daemon_settings(sync_interval=0.05,
                               queue={"backoff": {"delay": 1.5, "jitter": 0}})
    async with running(world.mongo, settings) as daemon:
        run = await finished_run(world.mongo, iid)
        assert daemon.jobs["refresh"].discovery is not None
        passes = daemon.jobs["refresh"].discovery._passes
    first, second = token_requests(world.oauth)
    assert second.monotonic - first.monotonic >= wait, (
        f"asked again after {second.monotonic - first.monotonic:.2f}s, not {wait}s")
    assert passes > 10  # discovery did run (full passes too) while the retry waited
    assert run["state"] == "completed" and run["attemptsMade"] == 2


async def test_transient_failures_keep_being_retried_until_the_token_expires(
        world: World) -> None:
    provider = await world.provider()
    iid, _ = await world.integration(provider, expires_in=1.5)
    # another tenant's integration, updated later: discovery's watermark moves past ours
    await world.integration(provider, expires_in=3600, tenant_id=new_hex_id(),
                            updated_at=utcnow() + timedelta(milliseconds=50))
    world.oauth.script(*[Fault(500, "down")] * 3)  # a short outage: 3 failed requests
    # Discovery every 0.2 s: the next full pass comes 10 passes (>= 2 s) after start,
    # after the token has expired.
    async with running(world.mongo, daemon_settings(sync_interval=0.2)):
        expiry = as_utc((await world.doc(iid))["tokenExpiresAt"])

        async def refreshed() -> bool:
            return as_utc((await world.doc(iid))["tokenExpiresAt"]) > expiry

        await wait_for(refreshed, timeout=max(0.0, (expiry - utcnow()).total_seconds()),
                       message="a refresh before the token expired")


async def test_a_permanent_failure_sends_one_request_and_is_not_rescheduled(
        world: World) -> None:
    provider = await world.provider()
    iid, rt = await world.integration(provider)
    world.oauth.revoke(rt)
    before = await world.doc(iid)
    async with running(world.mongo, daemon_settings(sync_interval=0.05)) as daemon:
        run = await finished_run(world.mongo, iid)
        assert (run["state"], run["attemptsMade"]) == ("failed", 1)
        assert run["error"]["permanent"] is True
        sync = daemon.jobs["refresh"].discovery
        assert sync is not None
        # discovery keeps running (full and incremental passes) and leaves it alone
        for full in (True, False, True):
            assert (await sync.sync_once(full=full)).added == 0
        passes = sync._passes
        await wait_for(lambda: sync._passes >= passes + 12, message="more discovery passes")
        assert await pending_refresh_runs(world.mongo, iid) == []
        assert len(token_requests(world.oauth)) == 1
        await _assert_given_up(world, iid, before, "invalid_grant")

        # the tenant reconnects: a new refresh token, and refreshing works again
        new_rt = world.oauth.issue_refresh_token(CID)
        await update_integration(world.mongo, iid, {
            "refreshToken": world.cipher.encrypt(new_rt),
            "accessToken": world.cipher.encrypt("at-reconnected"),
            "tokenExpiresAt": utcnow() + timedelta(seconds=20), "status": "active"})

        async def refreshed_again() -> bool:
            return len(await refresh_runs(world.mongo, iid, ("completed",))) == 1

        await wait_for(refreshed_again, message="refresh after the reconnect")
    assert [r.form["refresh_token"] for r in token_requests(world.oauth)] == [rt, new_rt]
    after = await world.doc(iid)
    assert after["status"] == "active"
    assert "refreshFailure" not in (await integration_state(world.mongo, iid) or {})


async def test_a_reconnect_during_the_refresh_keeps_the_newer_tokens(world: World) -> None:
    provider = await world.provider(rotate=True)
    iid, _ = await world.integration(provider)
    world.oauth.script(Hang(0.5))  # then Authlib answers (and rotates)
    async with running(world.mongo, daemon_settings()):
        await wait_for(lambda: len(token_requests(world.oauth)) == 1, message="request sent")
        reconnect_rt = world.oauth.issue_refresh_token(CID)
        reconnect = {"refreshToken": world.cipher.encrypt(reconnect_rt),
                     "accessToken": world.cipher.encrypt("at-from-reconnect"),
                     "tokenExpiresAt": utcnow() + timedelta(hours=1),
                     "scopesGranted": ["reconnected"], "status": "active"}
        await update_integration(world.mongo, iid, reconnect)
        run = await finished_run(world.mongo, iid)
    assert token_requests(world.oauth)[0].status == 200  # the refresh itself worked
    assert run["state"] == "completed" and "skipped" in run["result"]
    after = await world.doc(iid)
    for name in ("refreshToken", "accessToken", "scopesGranted", "status"):
        assert after[name] == reconnect[name], name
    assert close_to(after["tokenExpiresAt"], reconnect["tokenExpiresAt"],
                    reconnect["tokenExpiresAt"])
    assert world.cipher.decrypt(after["refreshToken"]) == reconnect_rt


async def test_a_revocation_during_the_refresh_is_not_undone(world: World) -> None:
    provider = await world.provider()
    iid, _ = await world.integration(provider)
    world.oauth.script(Hang(0.5))
    async with running(world.mongo, daemon_settings()):
        await wait_for(lambda: len(token_requests(world.oauth)) == 1, message="request sent")
        await update_integration(world.mongo, iid, {"status": "revoked"})
        before = await world.doc(iid)
        run = await finished_run(world.mongo, iid)
    assert run["state"] == "completed"
    assert await world.doc(iid) == before


async def test_a_revoked_integration_with_a_pending_job_is_never_refreshed(
        world: World) -> None:
    provider = await world.provider()
    iid, _ = await world.integration(provider, expires_in=61.0)  # lead 60: due in ~1 s
    async with running(world.mongo, daemon_settings()):
        await wait_for(lambda: _delayed(world.mongo, iid), message="job scheduled")
        # revoked by the user (or the backend's health check), unnoticed by discovery
        await update_integration(world.mongo, iid, {"status": "revoked"}, touch=False)
        before = await world.doc(iid)
        run = await finished_run(world.mongo, iid)
    assert run["state"] == "completed"
    assert run["result"] == {"skipped": "the integration is revoked"}
    assert token_requests(world.oauth) == []
    assert await world.doc(iid) == before


async def _delayed(mongo: Mongo, iid: str) -> bool:
    return [r["state"] for r in await pending_refresh_runs(mongo, iid)] == ["delayed"]


# -- per-provider limits ------------------------------------------------------------------------


def max_in_window(times: list[float], window: float) -> int:
    """The most arrivals within any `window` seconds."""
    times = sorted(times)
    best = 0
    for i, start in enumerate(times):
        best = max(best, sum(1 for t in times[i:] if t - start < window))
    return best


async def test_a_burst_for_one_provider_respects_its_concurrency_and_rate(
        world: World) -> None:
    concurrency, rate, burst = 2, 4.0, 8
    busy = await world.provider("busy-provider")
    other = await world.provider("other-provider")
    busy_ids = [(await world.integration(busy))[0] for _ in range(burst)]
    other_ids = [(await world.integration(other))[0] for _ in range(2)]
    # every request to either provider takes 0.6 s at the server
    world.oauth.script(*[Hang(0.6)] * (burst + 2))
    settings = daemon_settings(provider_concurrency=concurrency, provider_rate=rate)
    started = time.monotonic()
    async with running(world.mongo, settings) as daemon:
        for iid in busy_ids + other_ids:
            assert (await finished_run(world.mongo, iid, timeout=20))["state"] == "completed"
        assert daemon.jobs["refresh"].refresher is not None
    reqs = token_requests(world.oauth)
    assert all(r.status == 200 for r in reqs) and len(reqs) == burst + 2
    peaks = meter(world.oauth).peak
    assert peaks["busy-provider"] == concurrency  # reached, never exceeded
    arrivals = [r.monotonic for r in reqs if r.basic_auth and r.basic_auth[0] == "busy-provider"]
    # starts are 1/rate apart: at most `rate` in any second (50 ms of network jitter allowed)
    assert max_in_window(arrivals, 1.0 - 0.05) <= rate
    gaps = [b - a for a, b in zip(sorted(arrivals), sorted(arrivals)[1:], strict=False)]
    assert min(gaps) >= 1 / rate - 0.05
    # the other provider is limited on its own, not queued behind the busy one
    other_arrivals = [r.monotonic for r in reqs
                      if r.basic_auth and r.basic_auth[0] == "other-provider"]
    assert max(other_arrivals) - started < 2.0
    assert max(arrivals) - started >= (burst - 1) / rate - 0.05


# -- a provider's own configuration error: the provider waits, not its tenants ---------------


async def postponed(mongo: Mongo, iid: str) -> bool:
    runs = await pending_refresh_runs(mongo, iid)
    return len(runs) == 1 and runs[0]["state"] == "delayed" and any(
        a.get("outcome") == "postponed" for a in runs[0]["attempts"])


async def hold_alert(world: World, daemon: Daemon) -> list[str]:
    manager = AlertManager(daemon.settings, world.mongo, daemon.registry, channels=[],
                           rules=[Rule("provider_on_hold", provider_on_hold)])
    return [m.text for m in await manager.evaluate()]


async def test_a_wrong_client_secret_holds_the_provider_until_it_is_fixed(
        world: World, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # No re-probe within the test: only the fix of the provider's document resumes it.
    provider = await world.provider(rotate=True, name="Acme Drive")
    ids = [(await world.integration(provider, expires_in=30 + i))[0] for i in range(3)]
    other = await world.provider("other-client")  # another provider is not held
    other_id, _ = await world.integration(other)
    world.oauth.add_client(CID, "rotated-at-the-provider", rotate_refresh_token=True)
    before = {iid: await world.doc(iid) for iid in ids}
    settings = daemon_settings(sync_interval=0.1, provider_concurrency=1,
                               provider_hold_recheck=3600.0)
    with caplog.at_level(logging.INFO):
        async with running(world.mongo, settings) as daemon:
            for iid in ids:
                await wait_for(lambda iid=iid: postponed(world.mongo, iid),
                               message="refresh postponed")
            assert (await finished_run(world.mongo, other_id))["state"] == "completed"
            # not one tenant is touched, told or failed
            for iid in ids:
                assert await world.doc(iid) == before[iid]
                assert await notifications(world.mongo, iid) == []
                [run] = await pending_refresh_runs(world.mongo, iid)
                assert run["attemptsMade"] == 0 and run.get("error") is None
            assert await refresh_runs(world.mongo, None, ("failed",)) == []
            refused = [r for r in token_requests(world.oauth) if r.status == 401]
            assert len(refused) == 1  # the rest saw the hold before their turn came
            errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
            assert [r.getMessage() for r in errors] == [
                "provider put on hold: its token endpoint refuses our configuration of it; "
                "no tenant's status changes and its refreshes wait until the provider is fixed"]
            assert errors[0].__dict__["providerId"] == provider.hex
            assert errors[0].__dict__["error"] == "invalid_client"

            [alert] = await hold_alert(world, daemon)
            assert alert.startswith(f"[mwapjobs] FIRING: provider_on_hold (provider Acme Drive "
                                    f"({provider.hex})): invalid_client: ")
            earliest = min(as_utc(before[i]["tokenExpiresAt"]) for i in ids)
            assert "3 access tokens of this provider expire while it stays on hold, the " \
                   f"earliest at {earliest.isoformat(timespec='seconds')}" in alert
            assert "HTTP 401" in alert

            # the operator puts the new secret into cloudProviders: everything resumes
            await world.mongo.call(lambda db: db[PROVIDERS].update_one(
                {"_id": provider.id},
                {"$set": {"clientSecret": world.cipher.encrypt("rotated-at-the-provider"),
                          "updatedAt": utcnow()}}))
            for iid in ids:
                run = await finished_run(world.mongo, iid)
                assert run["state"] == "completed", run
            assert await hold_alert(world, daemon) == []
    for iid in ids:
        after = await world.doc(iid)
        assert after["status"] == "active"
        assert as_utc(after["tokenExpiresAt"]) > as_utc(before[iid]["tokenExpiresAt"])
    state = await ProviderHolds(world.mongo).state(provider.hex)
    assert state is not None and "hold" not in state
    assert state["lastHold"]["liftedBecause"] == "the provider's configuration changed"


async def test_a_held_provider_is_probed_again_by_one_refresh_and_resumes(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    provider = await world.provider()
    ids = [(await world.integration(provider))[0] for _ in range(4)]
    world.oauth.add_client(CID, "disabled-for-now")  # the provider side is broken
    holds = ProviderHolds(world.mongo)
    async with running(world.mongo, daemon_settings(provider_hold_recheck=0.4)):

        async def probed_twice() -> bool:
            state = await holds.state(provider.hex)
            return bool(state and (state.get("hold") or {}).get("probes", 0) >= 2)

        await wait_for(probed_twice, message="two re-probes")
        state = await holds.state(provider.hex)
        assert state is not None
        probes = state["hold"]["probes"]
        requests = len(token_requests(world.oauth))
        # the first wave (at most provider_concurrency before the hold is known), then
        # one request per re-probe, claimed by one run
        assert requests <= 4 + probes + 1, (requests, probes)
        for iid in ids:
            assert (await world.doc(iid))["status"] == "active"
        # fixed at the provider, not in our data: the next re-probe finds out
        world.oauth.add_client(CID, SECRET)
        for iid in ids:
            assert (await finished_run(world.mongo, iid))["state"] == "completed"
    state = await holds.state(provider.hex)
    assert state is not None and "hold" not in state
    assert state["lastHold"]["liftedBecause"] == "a refresh got through"
    assert await notifications(world.mongo) == []
