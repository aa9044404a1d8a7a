"""Tests of the Authlib-based test token endpoint (tests/support/oauth_server.py).

The client side is aiohttp, as in the daemon: form-encoded bodies and HTTP
Basic with RFC 6749 §2.3.1 (percent-encoded) credentials.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote, quote_plus

import aiohttp
import pytest

from tests.support.oauth_server import Fault, Hang, OAuthServer

UA = "MWAP-OAuth-Client/1.0"
FORM = "application/x-www-form-urlencoded"
CID, SECRET = "client-1", "s3cret"


@pytest.fixture(scope="module")
def oauth_server() -> Iterator[OAuthServer]:
    with OAuthServer() as server:
        yield server


@pytest.fixture
def oauth(oauth_server: OAuthServer) -> OAuthServer:
    oauth_server.reset()
    return oauth_server


def rfc_basic(client_id: str, secret: str,
              encode: Callable[[str], str] = lambda s: quote(s, safe="")) -> str:
    """An Authorization header per RFC 6749 §2.3.1: id and secret encoded before base64."""
    login, password = encode(client_id), encode(secret)
    if hasattr(aiohttp, "encode_basic_auth"):  # aiohttp >= 3.14 deprecates BasicAuth
        return str(aiohttp.encode_basic_auth(login, password))
    return aiohttp.BasicAuth(login, password, encoding="utf-8").encode()


async def post(url: str, form: dict[str, str] | None = None, *,
               auth: str | None = None, json_body: Any = None,
               timeout: float = 10.0) -> tuple[int, Any, str]:
    """POST (form, or JSON if `json_body`) and return (status, headers, text)."""
    headers = {"User-Agent": UA} | ({"Authorization": auth} if auth else {})
    async with aiohttp.ClientSession(
            headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)) as s:
        kwargs: dict[str, Any] = {"json": json_body} if json_body is not None else {"data": form}
        async with s.post(url, **kwargs) as resp:
            return resp.status, resp.headers, await resp.text()


async def refresh(oauth: OAuthServer, rt: str, *, client_id: str = CID, secret: str = SECRET,
                  method: str = "basic", scope: str | None = None,
                  timeout: float = 10.0) -> tuple[int, Any, Any]:
    """One refresh_token grant request; returns (status, headers, json)."""
    form = {"grant_type": "refresh_token", "refresh_token": rt}
    if scope is not None:
        form["scope"] = scope
    auth = None
    if method == "basic":
        auth = rfc_basic(client_id, secret)
    else:
        form |= {"client_id": client_id, "client_secret": secret}
    status, headers, text = await post(oauth.token_url, form, auth=auth, timeout=timeout)
    return status, headers, json.loads(text) if text else None


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


# -- the happy path and what is recorded ------------------------------------

async def test_refresh_with_basic_auth_and_recorded_request(oauth: OAuthServer) -> None:
    oauth.add_client(CID, SECRET)
    rt = oauth.issue_refresh_token(CID)

    status, headers, body = await refresh(oauth, rt)

    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert headers["Cache-Control"] == "no-store"
    assert body["token_type"] == "Bearer"
    assert body["access_token"].startswith("at-")
    assert body["expires_in"] == 3600
    assert body["scope"] == "files.read"
    # no rotation: the same refresh token is echoed and stays valid
    assert body["refresh_token"] == rt
    assert oauth.is_active(rt)

    [rec] = oauth.requests
    assert (rec.method, rec.path, rec.status) == ("POST", "/oauth/token", 200)
    assert rec.headers["user-agent"] == UA
    assert rec.headers["Content-Type"] == FORM
    assert rec.form == {"grant_type": "refresh_token", "refresh_token": rt}
    assert rec.basic_auth == (CID, SECRET)
    assert rec.headers["Authorization"].startswith("Basic ")
    assert (rec.client_id, rec.auth_method) == (CID, "client_secret_basic")
    assert rec.scripted is None
    assert rec.response_json == body


async def test_other_paths_are_recorded_as_404(oauth: OAuthServer) -> None:
    status, _, _ = await post(f"{oauth.url}/nope", {"a": "b"})
    assert status == 404
    assert [(r.path, r.status, r.form) for r in oauth.requests] == [("/nope", 404, {"a": "b"})]


# -- per-client behaviour ----------------------------------------------------

async def test_rotation_returns_new_token_and_rejects_the_old(oauth: OAuthServer) -> None:
    oauth.add_client(CID, SECRET, rotate_refresh_token=True)
    rt1 = oauth.issue_refresh_token(CID)

    status, _, body = await refresh(oauth, rt1)
    assert status == 200
    rt2 = body["refresh_token"]
    assert rt2 != rt1
    assert not oauth.is_active(rt1) and oauth.is_active(rt2)

    status, _, body = await refresh(oauth, rt1)
    assert (status, body["error"]) == (400, "invalid_grant")

    status, _, body = await refresh(oauth, rt2)
    assert status == 200 and body["refresh_token"] not in (rt1, rt2)


async def test_concurrent_refresh_of_a_rotating_token_has_one_winner(oauth: OAuthServer) -> None:
    oauth.add_client(CID, SECRET, rotate_refresh_token=True)
    rt = oauth.issue_refresh_token(CID)
    results = await asyncio.gather(*(refresh(oauth, rt) for _ in range(4)))
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200, 400, 400, 400]
    assert all(body["error"] == "invalid_grant" for status, _, body in results if status == 400)


async def test_no_refresh_token_returned_dropbox_like(oauth: OAuthServer) -> None:
    oauth.add_client(CID, SECRET, return_refresh_token=False)
    rt = oauth.issue_refresh_token(CID)
    for _ in range(2):  # the old token keeps working
        status, _, body = await refresh(oauth, rt)
        assert status == 200
        assert "refresh_token" not in body
        assert body["access_token"]


def test_rotation_without_returning_the_token_is_refused(oauth: OAuthServer) -> None:
    with pytest.raises(ValueError):
        oauth.add_client(CID, SECRET, rotate_refresh_token=True, return_refresh_token=False)


@pytest.mark.parametrize("expires_in", [None, 60])
async def test_expires_in_configurable_and_absent_when_none(
        oauth: OAuthServer, expires_in: int | None) -> None:
    oauth.add_client(CID, SECRET, expires_in=expires_in)
    status, _, body = await refresh(oauth, oauth.issue_refresh_token(CID))
    assert status == 200
    if expires_in is None:
        assert "expires_in" not in body
    else:
        assert body["expires_in"] == expires_in


async def test_scope_returned_narrowed_and_never_widened(oauth: OAuthServer) -> None:
    oauth.add_client(CID, SECRET, scope="files.read files.write")
    rt = oauth.issue_refresh_token(CID)
    status, _, body = await refresh(oauth, rt)
    assert (status, body["scope"]) == (200, "files.read files.write")

    status, _, body = await refresh(oauth, rt, scope="files.read")
    assert (status, body["scope"]) == (200, "files.read")

    narrow = oauth.issue_refresh_token(CID, scope="files.read")
    status, _, body = await refresh(oauth, narrow, scope="files.read files.write")
    assert (status, body["error"]) == (400, "invalid_scope")


# -- client authentication -----------------------------------------------------

async def test_client_secret_post_only_client(oauth: OAuthServer) -> None:
    oauth.add_client(CID, SECRET, auth_methods=("client_secret_post",))
    rt = oauth.issue_refresh_token(CID)

    status, headers, body = await refresh(oauth, rt, method="basic")
    assert (status, body["error"]) == (401, "invalid_client")
    assert headers["WWW-Authenticate"].startswith("Basic ")

    status, _, body = await refresh(oauth, rt, method="post")
    assert status == 200 and body["access_token"]
    rec = oauth.requests[-1]
    assert (rec.client_id, rec.auth_method, rec.basic_auth) == (CID, "client_secret_post", None)
    assert rec.form["client_secret"] == SECRET


async def test_basic_only_client_rejects_post_credentials(oauth: OAuthServer) -> None:
    oauth.add_client(CID, SECRET)
    status, _, body = await refresh(oauth, oauth.issue_refresh_token(CID), method="post")
    assert (status, body["error"]) == (401, "invalid_client")
    assert oauth.requests[-1].client_id is None


async def test_client_allowed_both_methods(oauth: OAuthServer) -> None:
    oauth.add_client(CID, SECRET, auth_methods=("client_secret_basic", "client_secret_post"))
    rt = oauth.issue_refresh_token(CID)
    assert (await refresh(oauth, rt, method="basic"))[0] == 200
    assert (await refresh(oauth, rt, method="post"))[0] == 200
    assert [r.auth_method for r in oauth.requests] == ["client_secret_basic", "client_secret_post"]


@pytest.mark.parametrize(("method", "client_id", "secret", "expected"), [
    ("basic", CID, "wrong", 401),
    ("post", CID, "wrong", 401),
    ("basic", "unknown", SECRET, 401),
    # Authlib's quirk: an unknown client_id in the form is 400, not 401
    ("post", "unknown", SECRET, 400),
])
async def test_invalid_client_json_error(
        oauth: OAuthServer, method: str, client_id: str, secret: str, expected: int) -> None:
    oauth.add_client(CID, SECRET, auth_methods=("client_secret_basic", "client_secret_post"))
    rt = oauth.issue_refresh_token(CID)
    status, headers, body = await refresh(oauth, rt, client_id=client_id, secret=secret,
                                          method=method)
    assert status == expected
    assert headers["Content-Type"] == "application/json"
    assert body["error"] == "invalid_client"
    assert oauth.is_active(rt)


# -- RFC 6749 §2.3.1: secrets with %, + and / in HTTP Basic --------------------

PCT_ESCAPE = "s3c%2Fr+e/t"   # contains a valid %XX escape
LENIENT = "s3c%r+e/t%"       # %, + and / but no valid %XX escape
SPACE = "s3c r+e/t"          # a space and a +

RAW: Callable[[str], str] = lambda s: s  # noqa: E731


@pytest.mark.parametrize(("secret", "encoding", "expected"), [
    # percent-encoding everything is always accepted
    (PCT_ESCAPE, lambda s: quote(s, safe=""), 200),
    (LENIENT, lambda s: quote(s, safe=""), 200),
    (SPACE, lambda s: quote(s, safe=""), 200),
    # the raw secret fails only when it holds a valid %XX escape (Authlib unquotes it)
    (PCT_ESCAPE, RAW, 401),
    (LENIENT, RAW, 200),
    (SPACE, RAW, 200),
    # quote_plus breaks spaces: Authlib uses unquote, not unquote_plus
    (PCT_ESCAPE, quote_plus, 200),
    (SPACE, quote_plus, 401),
], ids=["pct-quote", "lenient-quote", "space-quote", "pct-raw", "lenient-raw", "space-raw",
        "pct-quote_plus", "space-quote_plus"])
async def test_basic_credentials_encoding(
        oauth: OAuthServer, secret: str, encoding: Callable[[str], str], expected: int) -> None:
    oauth.add_client(CID, secret)
    rt = oauth.issue_refresh_token(CID)
    form = {"grant_type": "refresh_token", "refresh_token": rt}
    status, _, text = await post(oauth.token_url, form, auth=rfc_basic(CID, secret, encoding))
    assert status == expected, text
    rec = oauth.requests[-1]
    assert rec.basic_auth == (CID, encoding(secret))  # what went over the wire
    assert rec.client_id == (CID if expected == 200 else None)


@pytest.mark.parametrize("secret", [PCT_ESCAPE, LENIENT, SPACE])
async def test_special_secret_via_post_needs_only_form_encoding(
        oauth: OAuthServer, secret: str) -> None:
    oauth.add_client(CID, secret, auth_methods=("client_secret_post",))
    status, _, _ = await refresh(oauth, oauth.issue_refresh_token(CID), secret=secret,
                                 method="post")
    assert status == 200
    assert oauth.requests[-1].form["client_secret"] == secret


# -- invalid_grant and malformed requests -------------------------------------

async def test_invalid_grant_unknown_revoked_or_foreign_token(oauth: OAuthServer) -> None:
    oauth.add_client(CID, SECRET)
    oauth.add_client("other", "other-secret")
    revoked = oauth.issue_refresh_token(CID)
    oauth.revoke(revoked)
    foreign = oauth.issue_refresh_token("other")
    for rt in ("no-such-token", revoked, foreign):
        status, headers, body = await refresh(oauth, rt)
        assert status == 400, rt
        assert headers["Content-Type"] == "application/json"
        assert body["error"] == "invalid_grant"
    assert oauth.is_active(foreign)


async def test_revoke_takes_effect_immediately(oauth: OAuthServer) -> None:
    oauth.add_client(CID, SECRET)
    rt = oauth.issue_refresh_token(CID, refresh_token="my-token")
    assert rt == "my-token"
    assert (await refresh(oauth, rt))[0] == 200
    oauth.revoke(rt)
    assert not oauth.is_active(rt)
    status, _, body = await refresh(oauth, rt)
    assert (status, body["error"]) == (400, "invalid_grant")


async def test_json_body_is_not_a_token_request(oauth: OAuthServer) -> None:
    oauth.add_client(CID, SECRET)
    rt = oauth.issue_refresh_token(CID)
    status, _, text = await post(
        oauth.token_url, json_body={"grant_type": "refresh_token", "refresh_token": rt},
        auth=rfc_basic(CID, SECRET))
    assert status == 400
    assert '"unsupported_grant_type"' in text
    rec = oauth.requests[-1]
    assert rec.headers["Content-Type"] == "application/json"
    assert rec.form == {}
    assert rt.encode() in rec.body


# -- scripted faults -----------------------------------------------------------

async def test_scripted_500_then_real_success(oauth: OAuthServer) -> None:
    oauth.add_client(CID, SECRET, rotate_refresh_token=True)
    rt = oauth.issue_refresh_token(CID)
    oauth.script(Fault(status=500, body={"error": "server_error"}))

    status, _, body = await refresh(oauth, rt)
    assert (status, body) == (500, {"error": "server_error"})
    assert oauth.is_active(rt)  # the fault did not reach Authlib

    status, _, body = await refresh(oauth, rt)
    assert status == 200 and body["refresh_token"] != rt
    assert [(r.status, r.scripted) for r in oauth.requests] == [
        (500, Fault(status=500, body={"error": "server_error"})), (200, None)]
    # a scripted answer still records the request
    assert oauth.requests[0].form["refresh_token"] == rt
    assert oauth.requests[0].client_id is None


async def test_scripted_429_with_retry_after(oauth: OAuthServer) -> None:
    oauth.add_client(CID, SECRET)
    rt = oauth.issue_refresh_token(CID)
    oauth.script(Fault(status=429, headers={"Retry-After": "2"},
                       body={"error": "rate_limited"}))
    status, headers, body = await refresh(oauth, rt)
    assert status == 429
    assert headers["Retry-After"] == "2"
    assert body == {"error": "rate_limited"}
    assert (await refresh(oauth, rt))[0] == 200


async def test_scripted_faults_are_consumed_in_order(oauth: OAuthServer) -> None:
    oauth.add_client(CID, SECRET)
    rt = oauth.issue_refresh_token(CID)
    oauth.script(Fault(status=502), Fault(status=200, body="not json"))
    form = {"grant_type": "refresh_token", "refresh_token": rt}
    first = await post(oauth.token_url, form, auth=rfc_basic(CID, SECRET))
    second = await post(oauth.token_url, form, auth=rfc_basic(CID, SECRET))
    third = await post(oauth.token_url, form, auth=rfc_basic(CID, SECRET))
    assert (first[0], first[2]) == (502, "")
    assert (second[0], second[2]) == (200, "not json")
    assert second[1]["Content-Type"].startswith("text/plain")
    assert oauth.requests[1].response_json is None
    assert third[0] == 200 and '"access_token"' in third[2]


def test_script_rejects_non_faults(oauth: OAuthServer) -> None:
    with pytest.raises(TypeError):
        oauth.script(500)  # type: ignore[arg-type]


async def test_hang_triggers_client_timeout_without_refreshing(oauth: OAuthServer) -> None:
    oauth.add_client(CID, SECRET, rotate_refresh_token=True)
    rt = oauth.issue_refresh_token(CID)
    oauth.script(Hang(seconds=30))
    started = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        await refresh(oauth, rt, timeout=0.3)
    assert time.monotonic() - started < 5
    assert oauth.requests[0].status is None  # still sleeping
    assert oauth.is_active(rt)


async def test_hang_then_real_handling_or_fault(oauth: OAuthServer) -> None:
    oauth.add_client(CID, SECRET)
    rt = oauth.issue_refresh_token(CID)
    oauth.script(Hang(seconds=0.3), Hang(seconds=0.1, then=Fault(status=503)))
    started = time.monotonic()
    status, _, body = await refresh(oauth, rt)
    assert status == 200 and body["access_token"]
    assert time.monotonic() - started >= 0.3
    assert (await refresh(oauth, rt))[0] == 503


async def test_reset_wakes_a_hanging_handler(oauth: OAuthServer) -> None:
    oauth.add_client(CID, SECRET)
    rt = oauth.issue_refresh_token(CID)
    oauth.script(Hang(seconds=30))
    task = asyncio.create_task(refresh(oauth, rt))
    await wait_until(lambda: len(oauth.requests) == 1)
    hung = oauth.requests[0]
    started = time.monotonic()
    oauth.reset()
    status, _, body = await task
    assert time.monotonic() - started < 2
    assert (status, body["error"]) == (503, "temporarily_unavailable")
    assert hung.status == 503
    assert oauth.requests == []


async def test_stop_does_not_wait_for_a_hanging_handler() -> None:
    server = OAuthServer()
    server.start()
    server.add_client(CID, SECRET)
    rt = server.issue_refresh_token(CID)
    server.script(Hang(seconds=30))
    task = asyncio.create_task(refresh(server, rt))
    await wait_until(lambda: len(server.requests) == 1)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 2
    await wait_until(lambda: server.requests[0].status == 503)
    try:
        status, _, _ = await task
    except aiohttp.ClientError:
        pass  # the connection may be gone before the 503 is read
    else:
        assert status == 503
    with pytest.raises(RuntimeError):
        _ = server.url


async def test_reset_forgets_clients_tokens_script_and_requests(oauth: OAuthServer) -> None:
    oauth.add_client(CID, SECRET)
    rt = oauth.issue_refresh_token(CID)
    oauth.script(Fault(status=500))
    assert (await refresh(oauth, rt))[0] == 500
    oauth.reset()
    assert oauth.requests == [] and not oauth.is_active(rt)
    status, _, body = await refresh(oauth, rt)  # no script left; client unknown
    assert (status, body["error"]) == (401, "invalid_client")


def test_sync_use_and_context_manager() -> None:
    import urllib.error
    import urllib.request

    with OAuthServer() as server:
        assert server.token_url == f"{server.url}/oauth/token"
        server.add_client(CID, SECRET, auth_methods=("client_secret_post",))
        rt = server.issue_refresh_token(CID)
        data = (f"grant_type=refresh_token&refresh_token={rt}"
                f"&client_id={CID}&client_secret={SECRET}").encode()
        req = urllib.request.Request(server.token_url, data=data)
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.status == 200
        assert server.requests[0].headers["Content-Type"] == FORM
        assert server.requests[0].headers["User-Agent"].startswith("Python-urllib/")
