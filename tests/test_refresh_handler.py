"""The token-refresh handler alone (`TokenRefresher(job)`), against a real Authlib token
endpoint (RFC 6749 §6): the exact request (client authentication, encodings, method),
the exact write-back, how each answer is classified (a dead grant, a provider's own
configuration error, a refusal to retry, a transient failure) and what is scrubbed
from the provider's error texts.

The behaviour inside a running daemon (retries, expiry, follow-ups, provider holds) is
in test_refresh_daemon.py; the shared world is tests/support/refresh_world.py.
"""

from __future__ import annotations

import base64
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus

import aiohttp
import pytest

from mwapjobs.config import RefreshSettings
from mwapjobs.crypto import MwapCipher
from mwapjobs.jobs.refresh.handler import RefreshFailed, TokenRefresher
from mwapjobs.jobs.refresh.runs import QUEUE, job_id
from mwapjobs.queues import AndThen, Job, Postpone, TransientError
from mwapjobs.ratelimit import KeyedLimiter
from mwapjobs.storage.integrations import IntegrationStore
from mwapjobs.storage.providers import config_fingerprint
from tests.support.mwap_data import (
    ABSENT,
    as_utc,
    get_integration,
    insert_integration,
    integration_state,
    new_hex_id,
    notifications,
    utcnow,
)
from tests.support.oauth_server import Fault, Hang, OAuthServer
from tests.support.refresh_world import (
    CID,
    FORM,
    LOCAL,
    SECRET,
    UA,
    World,
    assert_given_up,
    changed_fields,
    close_to,
    hold_of,
    issued,
    provider_doc_of,
    token_requests,
)


def job_for(integration_id: str, attempt: int = 1) -> Job:
    return Job(run_id=new_hex_id(), queue=QUEUE, job_id=job_id(integration_id),
               data={"integrationId": integration_id}, attempt=attempt, max_attempts=3,
               created_at=utcnow(), deadline=None)


async def refresh_once(world: World, iid: str, **settings: Any) -> Any:
    """Run the refresh handler once, as the engine would, and return its result (without
    the next run it asks for: see test_the_next_run_goes_with_the_result)."""
    answer = await handle_once(world, iid, **settings)
    return answer.result if isinstance(answer, AndThen) else answer


async def handle_once(world: World, iid: str, **settings: Any) -> Any:
    async with aiohttp.ClientSession() as http:
        refresher = TokenRefresher(IntegrationStore(world.mongo), world.cipher, http,
                                   RefreshSettings(**settings), utcnow, policy=LOCAL)
        return await refresher(job_for(iid))


# -- the request and the write-back ------------------------------------------------------------


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


async def test_the_next_run_goes_with_the_result(world: World) -> None:
    """Tokens written: the handler hands the engine the next refresh (written with the
    completion, one round trip), for the new tokens, due `lead` (+ jitter) before the
    new expiry, which is its deadline."""
    provider = await world.provider()
    iid, _ = await world.integration(provider)
    settings = RefreshSettings(lead=300, jitter=30)

    answer = await handle_once(world, iid, lead=300, jitter=30)

    assert isinstance(answer, AndThen)
    expires = as_utc((await world.doc(iid))["tokenExpiresAt"])
    assert abs(datetime.fromisoformat(answer.result["expiresAt"]) - expires) < timedelta(
        milliseconds=1)  # BSON dates keep milliseconds
    assert answer.job_id == job_id(iid) and answer.data["integrationId"] == iid
    assert answer.data["connection"] == answer.result["connection"]
    assert answer.deadline is not None and abs(answer.deadline - expires) < timedelta(
        milliseconds=1)
    assert expires - timedelta(seconds=settings.lead + settings.jitter) <= answer.run_at \
        <= expires - timedelta(seconds=settings.lead)


async def test_no_query_waits_between_the_paced_start_and_the_request(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The limiter spaces the starts of a provider's requests; a query between a start
    and its request (waiting on a busy store) would bunch requests at the provider."""
    provider = await world.provider()
    iid, _ = await world.integration(provider)
    trips: dict[str, int] = {}
    real_slot, real_request = KeyedLimiter.slot, TokenRefresher._request

    @contextlib.asynccontextmanager
    async def slot(self: KeyedLimiter, key: str) -> AsyncIterator[None]:
        async with real_slot(self, key):
            trips["start"] = world.mongo.round_trips
            yield

    async def request(self: TokenRefresher, *args: Any) -> Any:
        trips["request"] = world.mongo.round_trips
        return await real_request(self, *args)

    monkeypatch.setattr(KeyedLimiter, "slot", slot)
    monkeypatch.setattr(TokenRefresher, "_request", request)
    await refresh_once(world, iid)
    assert trips["request"] == trips["start"], trips


async def test_no_next_run_when_nothing_was_written(world: World) -> None:
    provider = await world.provider()
    iid, _ = await world.integration(provider, status="revoked")
    answer = await handle_once(world, iid)
    assert not isinstance(answer, AndThen) and "skipped" in answer


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
    await assert_given_up(world, iid, before, expected)
    assert await hold_of(world, provider) is None


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

