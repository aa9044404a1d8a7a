"""Authentication and authorization: admin tokens, Auth0 JWTs, roles from MongoDB.

Tokens are real RS256 JWTs signed with RSA keys whose JWKS is served over HTTP
on 127.0.0.1 (tests/support/jwks.py). Time inside the JWKS cache is a fake
clock, so TTL and refetch limits are tested without sleeping.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import re
import subprocess
import sys
import time
import tomllib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request
from bson import ObjectId
from cryptography.hazmat.primitives.asymmetric import rsa

from mwapjobs.api.auth import CALLER_KEY, Authenticator, AuthError, Caller, JwksCache
from mwapjobs.api.envelope import envelope_middleware, ok
from mwapjobs.config import Settings
from mwapjobs.storage.identity import IdentityStore
from mwapjobs.storage.mongo import Mongo
from tests.conftest import ROOT, make_settings, wait_for
from tests.support.jwks import JwksServer

SUPER = "auth0|superadmin"
OWNER = "auth0|owner"
STRANGER = "auth0|stranger"
TENANT = ObjectId()
OTHER_TENANT = ObjectId()
OPS_TOKEN = "mwj_ops-token-for-tests-0123456789abcdef"
CI_TOKEN = "mwj_ci-token-for-tests-0123456789abcdef"


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def settings(audience: str | None, **overrides: Any) -> Settings:
    """Two admin tokens, and Auth0 configured when `audience` is given."""
    tokens = [{"name": "ops", "sha256": sha256(OPS_TOKEN)},
              {"name": "ci", "sha256": sha256(CI_TOKEN)}]
    auth0 = {"auth0_domain": "idp.test", "auth0_audience": audience} if audience else {}
    return make_settings(admin={"tokens": tokens}, **auth0, **overrides)


class Clock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
async def idp() -> AsyncIterator[JwksServer]:
    async with JwksServer() as server:
        yield server


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def jwks(idp: JwksServer, clock: Clock) -> AsyncIterator[JwksCache]:
    cache = idp.cache(clock=clock, ttl=600)
    yield cache
    await cache.close()


@pytest.fixture
async def identity(mongo: Mongo) -> IdentityStore:
    await mongo.call(lambda db: db.superadmins.insert_one({"userId": SUPER}))
    await mongo.call(lambda db: db.tenants.insert_many([
        {"_id": TENANT, "name": "acme", "ownerId": OWNER},
        {"_id": OTHER_TENANT, "name": "globex", "ownerId": STRANGER},
    ]))
    return IdentityStore(mongo)


@pytest.fixture
def auth(idp: JwksServer, identity: IdentityStore, jwks: JwksCache) -> Authenticator:
    return Authenticator(settings(idp.audience), identity, jwks)


def request(authorization: str | None = None) -> web.Request:
    headers = {"Authorization": authorization} if authorization is not None else {}
    return make_mocked_request("GET", "/admin", headers=headers)


def bearer(token: str) -> web.Request:
    return request(f"Bearer {token}")


async def unauthorized(auth: Authenticator, token: str) -> AuthError:
    with pytest.raises(AuthError) as caught:
        await auth.authenticate(bearer(token))
    assert (caught.value.status, caught.value.code) == (401, "auth/unauthorized")
    assert token not in caught.value.message
    return caught.value


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# -- users and roles -----------------------------------------------------------


async def test_a_superadmin_jwt_gives_a_superadmin_user(auth: Authenticator,
                                                        idp: JwksServer) -> None:
    caller = await auth.require_admin(bearer(idp.token(SUPER)))
    assert caller == Caller("user", SUPER, superadmin=True)
    assert caller.actor == f"user:{SUPER}"
    assert await auth.require_tenant_access(bearer(idp.token(SUPER)), str(OTHER_TENANT)) == caller


async def test_a_plain_user_reaches_only_the_tenant_they_own(auth: Authenticator,
                                                             idp: JwksServer) -> None:
    token = idp.token(OWNER)
    assert await auth.authenticate(bearer(token)) == Caller("user", OWNER, superadmin=False)
    assert await auth.require_tenant_access(bearer(token), str(TENANT)) == Caller(
        "user", OWNER, superadmin=False)
    for denied in (auth.require_admin(bearer(token)),
                   auth.require_tenant_access(bearer(token), str(OTHER_TENANT)),
                   auth.require_tenant_access(bearer(token), "not-an-object-id")):
        with pytest.raises(AuthError) as caught:
            await denied
        assert (caught.value.status, caught.value.code) == (403, "auth/forbidden")


async def test_identity_store_answers_false_rather_than_raising(mongo: Mongo,
                                                                identity: IdentityStore) -> None:
    await mongo.call(lambda db: db.tenants.insert_one({"_id": "plain-string", "ownerId": OWNER}))
    assert await identity.is_tenant_owner(str(TENANT), OWNER)
    assert not await identity.is_tenant_owner(str(TENANT), STRANGER)
    assert not await identity.is_tenant_owner("plain-string", OWNER)  # ids are ObjectIds
    assert not await identity.is_tenant_owner("", OWNER)
    assert await identity.is_superadmin(SUPER)
    assert not await identity.is_superadmin(OWNER)


# -- JWTs that must be refused ------------------------------------------------


def _hs256_with_public_key(idp: JwksServer) -> str:
    """The key-confusion attack: HMAC-sign with the RSA public key as the secret.
    PyJWT refuses to make such a token, so it is built by hand, as an attacker would."""
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "key-1"}).encode())
    payload = b64url(json.dumps(idp.claims(SUPER)).encode())
    signing_input = f"{header}.{payload}".encode()
    signature = hmac.new(idp.public_pem("key-1"), signing_input, hashlib.sha256).digest()
    return f"{header}.{payload}.{b64url(signature)}"


def _forged_signature(idp: JwksServer) -> str:
    """Signed by the attacker's own key, but naming the published key's kid."""
    attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return idp.sign(idp.claims(SUPER), kid="key-1", key=attacker)


REFUSED: dict[str, Callable[[JwksServer], str]] = {
    "wrong audience": lambda idp: idp.token(SUPER, aud="https://another.api"),
    "wrong issuer": lambda idp: idp.token(SUPER, iss="https://evil.test/"),
    "issuer without trailing slash": lambda idp: idp.token(SUPER, iss=idp.issuer.rstrip("/")),
    "expired beyond leeway": lambda idp: idp.token(SUPER, exp=int(time.time()) - 60),
    "no exp": lambda idp: idp.token(SUPER, exp=None),
    "no aud": lambda idp: idp.token(SUPER, aud=None),
    "empty sub": lambda idp: idp.token(""),
    "alg none": lambda idp: idp.sign(idp.claims(SUPER), alg="none", kid="key-1"),
    "HS256 with the public key": _hs256_with_public_key,
    "forged signature": _forged_signature,
    "malformed": lambda idp: "not.a.jwt",
    "no kid": lambda idp: idp.sign(idp.claims(SUPER), headers={}),
}


@pytest.mark.parametrize("make_token", REFUSED.values(), ids=REFUSED.keys())
async def test_bad_jwts_are_refused(auth: Authenticator, idp: JwksServer,
                                    make_token: Callable[[JwksServer], str]) -> None:
    await unauthorized(auth, make_token(idp))


async def test_small_clock_skew_is_tolerated(auth: Authenticator, idp: JwksServer) -> None:
    token = idp.token(SUPER, exp=int(time.time()) - 5)
    assert (await auth.authenticate(bearer(token))).name == SUPER


async def test_an_expired_token_is_reported_as_expired(auth: Authenticator,
                                                       idp: JwksServer) -> None:
    error = await unauthorized(auth, idp.token(SUPER, exp=int(time.time()) - 60))
    assert "expired" in error.message


# -- the JWKS cache -------------------------------------------------------------


async def test_keys_are_cached_until_the_ttl(auth: Authenticator, idp: JwksServer,
                                             clock: Clock) -> None:
    await auth.authenticate(bearer(idp.token(SUPER)))
    await auth.authenticate(bearer(idp.token(OWNER)))
    assert idp.fetches == 1
    clock.advance(601)
    await auth.authenticate(bearer(idp.token(SUPER)))
    assert idp.fetches == 2


async def test_an_unknown_kid_refetches_at_most_once_per_interval(
    auth: Authenticator, idp: JwksServer, clock: Clock
) -> None:
    await auth.authenticate(bearer(idp.token(SUPER)))
    unpublished = idp.add_key("never-published", serve=False)
    await unauthorized(auth, idp.token(SUPER, kid=unpublished))
    assert idp.fetches == 1  # the keys were fetched a moment ago: no refetch yet
    clock.advance(31)
    await unauthorized(auth, idp.token(SUPER, kid=unpublished))
    assert idp.fetches == 2  # refetched once, still unknown
    await unauthorized(auth, idp.sign(idp.claims(SUPER), headers={"kid": "random-kid"}))
    assert idp.fetches == 2


async def test_forged_headers_do_not_cause_jwks_fetches(auth: Authenticator, idp: JwksServer,
                                                       clock: Clock) -> None:
    await auth.authenticate(bearer(idp.token(SUPER)))
    clock.advance(31)
    await unauthorized(auth, idp.sign(idp.claims(SUPER), alg="none", kid="random-kid"))
    await unauthorized(auth, idp.sign(idp.claims(SUPER), headers={}))
    assert idp.fetches == 1


async def test_a_rotated_key_is_accepted_after_a_refetch(auth: Authenticator, idp: JwksServer,
                                                         clock: Clock) -> None:
    old = idp.token(SUPER)
    await auth.authenticate(bearer(old))
    clock.advance(31)
    new_kid = idp.add_key("key-2")
    caller = await auth.authenticate(bearer(idp.token(SUPER, kid=new_kid)))
    assert caller.name == SUPER
    assert idp.fetches == 2
    assert (await auth.authenticate(bearer(old))).name == SUPER  # both keys are served
    assert idp.fetches == 2


async def test_a_cold_cache_makes_one_fetch_for_concurrent_callers_without_blocking_the_loop(
    auth: Authenticator, idp: JwksServer
) -> None:
    idp.hold()
    tokens = [idp.token(sub) for sub in (SUPER, OWNER, STRANGER, SUPER, OWNER)]
    tasks = [asyncio.ensure_future(auth.authenticate(bearer(t))) for t in tokens]
    # The JWKS server runs on this same loop: it can only see the request if
    # the fetch is asynchronous.
    await wait_for(lambda: idp.fetches == 1, message="the JWKS request")
    assert not any(task.done() for task in tasks)
    idp.release()
    callers = await asyncio.gather(*tasks)
    assert [c.name for c in callers] == [SUPER, OWNER, STRANGER, SUPER, OWNER]
    assert idp.fetches == 1


async def test_cached_keys_survive_a_failing_refetch(auth: Authenticator, idp: JwksServer,
                                                     clock: Clock) -> None:
    await auth.authenticate(bearer(idp.token(SUPER)))
    idp.status = 503
    clock.advance(601)
    assert (await auth.authenticate(bearer(idp.token(SUPER)))).name == SUPER
    assert idp.fetches == 2


async def test_no_keys_at_all_is_a_503_not_a_401(auth: Authenticator, idp: JwksServer) -> None:
    idp.status = 500
    with pytest.raises(AuthError) as caught:
        await auth.authenticate(bearer(idp.token(SUPER)))
    assert (caught.value.status, caught.value.code) == (503, "auth/unavailable")


async def test_a_session_passed_in_is_used_and_left_open(idp: JwksServer) -> None:
    async with aiohttp.ClientSession() as session:
        cache = idp.cache(session=session)
        assert (await cache.get_key("key-1")).key_id == "key-1"
        await cache.close()
        assert not session.closed
        assert idp.fetches == 1


def test_auth0_urls_are_derived_from_the_domain() -> None:
    cache = JwksCache.from_settings(settings("https://api.mwap.test"))
    assert cache is not None
    assert cache.jwks_url == "https://idp.test/.well-known/jwks.json"
    assert cache.issuer == "https://idp.test/"
    assert JwksCache.from_settings(settings(None)) is None


# -- without Auth0 --------------------------------------------------------------


async def test_without_auth0_jwts_are_refused_but_admin_tokens_work(
    identity: IdentityStore, idp: JwksServer
) -> None:
    auth = Authenticator(settings(None), identity, None)
    error = await unauthorized(auth, idp.token(SUPER))
    assert "not configured" in error.message
    assert (await auth.authenticate(bearer(OPS_TOKEN))).actor == "token:ops"
    assert idp.fetches == 0


# -- admin tokens -------------------------------------------------------------


async def test_an_admin_token_is_an_admin(auth: Authenticator) -> None:
    caller = await auth.require_admin(bearer(CI_TOKEN))
    assert caller == Caller("token", "ci", superadmin=True)
    assert caller.actor == "token:ci"
    assert await auth.require_tenant_access(bearer(CI_TOKEN), str(TENANT)) == caller


@pytest.mark.parametrize("token", [OPS_TOKEN + "x", OPS_TOKEN[:-1], sha256(OPS_TOKEN), "é"])
async def test_a_wrong_admin_token_is_refused(auth: Authenticator, token: str) -> None:
    await unauthorized(auth, token)


async def test_admin_tokens_are_compared_in_constant_time_against_every_entry(
    auth: Authenticator, monkeypatch: pytest.MonkeyPatch
) -> None:
    compared: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def counting(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    await auth.authenticate(bearer(OPS_TOKEN))  # matches the first of two entries
    assert compared == [(sha256(OPS_TOKEN), sha256(OPS_TOKEN)),
                        (sha256(OPS_TOKEN), sha256(CI_TOKEN))]
    compared.clear()
    await unauthorized(auth, "mwj_wrong")
    assert len(compared) == 2


# -- the request ---------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::aiohttp.web.NotAppKeyWarning")
async def test_a_caller_set_by_a_session_middleware_is_used_as_is(auth: Authenticator) -> None:
    req = request()
    req[CALLER_KEY] = Caller("user", OWNER, superadmin=False)
    assert await auth.authenticate(req) == Caller("user", OWNER, superadmin=False)
    with pytest.raises(AuthError) as caught:
        await auth.require_admin(req)
    assert caught.value.status == 403


async def test_failures_are_logged_with_reason_and_address_but_never_the_token(
    auth: Authenticator, idp: JwksServer, caplog: pytest.LogCaptureFixture
) -> None:
    expired = idp.token(SUPER, exp=int(time.time()) - 60)
    req = make_mocked_request("GET", "/admin", headers={"Authorization": f"Bearer {expired}"},
                              transport=_Transport("203.0.113.9"))
    with caplog.at_level(logging.INFO, logger="mwapjobs.api.auth"), pytest.raises(AuthError):
        await auth.authenticate(req)
    failures = [r for r in caplog.records if r.getMessage().startswith("authentication failed")]
    assert len(failures) == 1
    assert failures[0].levelno == logging.INFO
    assert vars(failures[0])["reason"] == "JWT expired"
    assert vars(failures[0])["remote"] == "203.0.113.9"
    assert expired not in caplog.text


class _Transport:
    """Just enough of a transport for `request.remote`."""

    def __init__(self, peer: str) -> None:
        self.peer = peer

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return (self.peer, 40000) if name == "peername" else default


# -- through HTTP, in MWAP's envelope ------------------------------------------


@pytest.fixture
async def client(auth: Authenticator) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    async def admin(request: web.Request) -> web.StreamResponse:
        return ok({"actor": (await auth.require_admin(request)).actor})

    async def tenant(request: web.Request) -> web.StreamResponse:
        caller = await auth.require_tenant_access(request, request.match_info["id"])
        return ok({"actor": caller.actor})

    app = web.Application(middlewares=[envelope_middleware])
    app.router.add_get("/admin", admin)
    app.router.add_get("/tenants/{id}", tenant)
    async with TestClient(TestServer(app)) as c:
        yield c


async def test_http_admin_token_is_accepted(
    client: TestClient[web.Request, web.Application]
) -> None:
    async with client.get("/admin", headers={"Authorization": f"Bearer {OPS_TOKEN}"}) as r:
        assert r.status == 200
        assert await r.json() == {"success": True, "data": {"actor": "token:ops"}}


@pytest.mark.parametrize("authorization", [
    None, "", f"Basic {base64.b64encode(b'ops:' + OPS_TOKEN.encode()).decode()}", "Bearer",
    f"Bearer {OPS_TOKEN} extra", f"Bearer {OPS_TOKEN}-wrong", f"Token {OPS_TOKEN}",
], ids=["missing", "empty", "basic", "no value", "two values", "wrong token", "other scheme"])
async def test_http_bad_credentials_are_401_in_the_envelope(
    client: TestClient[web.Request, web.Application], authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    async with client.get("/admin", headers=headers) as r:
        assert r.status == 401
        body = await r.text()
    envelope = json.loads(body)
    assert envelope["success"] is False
    assert envelope["error"]["code"] == "auth/unauthorized"
    assert envelope["error"]["message"]
    assert OPS_TOKEN not in body


async def test_http_expired_jwt_is_401_without_echoing_it(
    client: TestClient[web.Request, web.Application], idp: JwksServer
) -> None:
    token = idp.token(SUPER, exp=int(time.time()) - 60)
    async with client.get("/admin", headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 401
        body = await r.text()
    assert json.loads(body)["error"]["code"] == "auth/unauthorized"
    assert token not in body
    assert token.split(".")[2] not in body


async def test_http_roles(client: TestClient[web.Request, web.Application],
                          idp: JwksServer) -> None:
    owner = {"Authorization": f"Bearer {idp.token(OWNER)}"}
    async with client.get("/admin", headers=owner) as r:
        assert r.status == 403
        assert (await r.json())["error"]["code"] == "auth/forbidden"
    async with client.get(f"/tenants/{TENANT}", headers=owner) as r:
        assert r.status == 200
        assert (await r.json())["data"] == {"actor": f"user:{OWNER}"}
    async with client.get(f"/tenants/{OTHER_TENANT}", headers=owner) as r:
        assert r.status == 403
        assert (await r.json())["error"]["code"] == "auth/forbidden"


# -- `mwapjobs admin-token` ------------------------------------------------------


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the CLI with no database and a broken config around it: it must need neither."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MWAPJOBS_") and k not in ("MONGODB_URI", "AUTH0_DOMAIN")}
    env["MWAPJOBS_NOT_A_SETTING"] = "1"
    env["PYTHONPATH"] = str(ROOT)
    (cwd / "config.toml").write_text("this is not = = toml\n")
    return subprocess.run([sys.executable, "-m", "mwapjobs", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


async def test_admin_token_cli_prints_a_token_and_a_working_config_entry(
    tmp_path: Path, identity: IdentityStore
) -> None:
    result = run_cli("admin-token", "ci-bot", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    token = re.search(r"^ {4}(mwj_\S+)$", out, re.MULTILINE)
    assert token is not None, out
    toml_entry = out[out.index("[[admin.tokens]]"):out.index("\n\n", out.index("[[admin"))]
    config = tomllib.loads(toml_entry)
    assert config == {"admin": {"tokens": [{"name": "ci-bot",
                                            "sha256": sha256(token.group(1))}]}}
    env_json = re.search(r"^MWAPJOBS_ADMIN__TOKENS='(.*)'$", out, re.MULTILINE)
    assert env_json is not None, out
    assert json.loads(env_json.group(1)) == config["admin"]["tokens"]

    auth = Authenticator(make_settings(admin=config["admin"]), identity, None)
    caller = await auth.authenticate(bearer(token.group(1)))
    assert caller == Caller("token", "ci-bot", superadmin=True)


async def test_admin_token_cli_makes_a_new_token_each_time(tmp_path: Path) -> None:
    first, second = (run_cli("admin-token", "ops", cwd=tmp_path).stdout for _ in range(2))
    assert first != second


@pytest.mark.parametrize("name", ["", "has space", "-leading-dash", "quote\"d", "x" * 101])
def test_admin_token_cli_rejects_a_bad_name(tmp_path: Path, name: str) -> None:
    result = run_cli("admin-token", "--", name, cwd=tmp_path)
    assert result.returncode == 2
    assert "NAME" in result.stderr
    assert "mwj_" not in result.stdout
