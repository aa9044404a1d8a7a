"""POST /api/v1/oauth/tenants/{tenantId}/integrations/{integrationId}/refresh

The daemon runs in-process with a real Authlib token endpoint, users' JWTs
signed by a local JWKS (tests/support/jwks.py) and roles read from MWAP's own
`tenants` and `superadmins` collections.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import aiohttp
import pytest

from mwapjobs.api.auth import Authenticator
from mwapjobs.daemon import Daemon
from mwapjobs.jobs.refresh.runs import MANUAL_PRIORITY, QUEUE
from mwapjobs.logs import JsonFormatter, secrets, setup_logging, stop_logging
from mwapjobs.storage.identity import IdentityStore
from mwapjobs.storage.mongo import Mongo
from tests.conftest import make_settings, wait_for
from tests.support.jwks import JwksServer
from tests.support.mwap_data import (
    ABSENT,
    SeededProvider,
    as_utc,
    get_integration,
    insert_integration,
    insert_provider,
    insert_superadmin,
    insert_tenant,
    new_hex_id,
    pending_refresh_runs,
    refresh_runs,
    test_cipher,
    utcnow,
)
from tests.support.oauth_server import Hang, OAuthServer
from tests.support.refresh_world import finished_run, running, token_requests

CID, SECRET = "mwap-client", "s3cret%2Fvalue"
OWNER, OTHER_OWNER, SUPER, STRANGER = ("auth0|owner-a", "auth0|owner-b", "auth0|super",
                                       "auth0|stranger")
ADMIN_TOKEN = "mwapjobs-admin-token-for-tests-0123456789"
TEST_SERVER_LOGGERS = ("authlib", "werkzeug", "flask")
# pymongo's loggers (pymongo/logger.py): at DEBUG they write whole commands and replies.
PYMONGO_LOGGERS = ("pymongo", "pymongo.command", "pymongo.connection",
                   "pymongo.serverSelection", "pymongo.client", "pymongo.topology")
PATH = "/api/v1/oauth/tenants/{tenant}/integrations/{integration}/refresh"


@pytest.fixture
async def idp() -> AsyncIterator[JwksServer]:
    async with JwksServer() as server:
        yield server


@dataclass
class Api:
    daemon: Daemon
    mongo: Mongo
    oauth: OAuthServer
    idp: JwksServer
    provider: SeededProvider
    tenant_a: str
    tenant_b: str

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.daemon.port}"

    def bearer(self, who: str) -> dict[str, str]:
        token = ADMIN_TOKEN if who == "admin" else self.idp.token(who)
        return {"Authorization": f"Bearer {token}"}

    async def post(self, tenant: str, integration: str, who: str | None = OWNER,
                   query: str = "", headers: dict[str, str] | None = None
                   ) -> tuple[int, dict[str, Any], str]:
        url = self.base + PATH.format(tenant=tenant, integration=integration) + query
        sent = {**(self.bearer(who) if who else {}), **(headers or {})}
        async with aiohttp.ClientSession() as http, http.post(url, headers=sent) as resp:
            text = await resp.text()
            return resp.status, json.loads(text), text

    async def integration(self, tenant: str | None = None, *, expires_in: float = 3600,
                          **options: Any) -> tuple[str, str]:
        rt = self.oauth.issue_refresh_token(CID)
        options.setdefault("refresh_token", rt)
        options.setdefault("access_token", "at-before")
        iid = await insert_integration(self.mongo, test_cipher(), provider=self.provider,
                                       tenant_id=tenant or self.tenant_a,
                                       expires_in=expires_in, **options)
        return iid, rt


@pytest.fixture
async def api(mongo: Mongo, oauth: OAuthServer, idp: JwksServer) -> AsyncIterator[Api]:
    oauth.add_client(CID, SECRET, rotate_refresh_token=True)
    provider = await insert_provider(mongo, test_cipher(), token_url=oauth.token_url,
                                     client_id=CID, client_secret=SECRET)
    tenant_a = await insert_tenant(mongo, OWNER)
    tenant_b = await insert_tenant(mongo, OTHER_OWNER)
    await insert_superadmin(mongo, SUPER)
    settings = make_settings(
        auth0_domain="idp.test", auth0_audience=idp.audience,
        admin={"tokens": [{"name": "ops",
                           "sha256": hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()}]},
        refresh={"lead": 60, "jitter": 0, "sync_interval": 3600, "wait_timeout": 10},
        queues={QUEUE: {"backoff": {"delay": 0.1, "jitter": 0}}},
    )
    jwks = idp.cache()

    def use_idp(daemon: Daemon) -> None:
        daemon.auth = Authenticator(settings, IdentityStore(mongo), jwks)

    try:
        async with running(mongo, settings, prepare=use_idp) as daemon:
            sync = daemon.jobs["refresh"].discovery
            assert sync is not None
            await wait_for(lambda: sync.last_sync is not None, message="first discovery pass")
            yield Api(daemon, mongo, oauth, idp, provider, tenant_a, tenant_b)
    finally:
        await jwks.close()


# The next refresh, scheduled for the new tokens once one completes, is delayed: not these.
FINISHED_OR_RUNNING = ("waiting", "active", "completed", "failed")


# -- who may -----------------------------------------------------------------------------------


async def test_the_owner_refreshes_and_a_pending_run_is_moved_to_now(api: Api) -> None:
    iid, rt = await api.integration()
    assert api.daemon.jobs["refresh"].discovery is not None
    await api.daemon.jobs["refresh"].discovery.sync_once()  # schedules it 60 s before expiry
    [pending] = await pending_refresh_runs(api.mongo, iid)
    assert pending["state"] == "delayed"

    status, body, _ = await api.post(api.tenant_a, iid)

    assert status == 202 and body["success"] is True
    assert body["data"]["runId"] == str(pending["_id"])  # the same run, moved
    assert body["data"]["state"] in ("waiting", "active", "completed")
    run = await finished_run(api.mongo, iid)
    assert run["_id"] == pending["_id"] and run["state"] == "completed"
    assert run["priority"] == MANUAL_PRIORITY
    assert as_utc(run["runAt"]) < as_utc(pending["runAt"]) - timedelta(seconds=3000)
    assert len(await refresh_runs(api.mongo, iid, FINISHED_OR_RUNNING)) == 1  # not duplicated
    [req] = token_requests(api.oauth)
    assert req.form["refresh_token"] == rt and req.status == 200
    doc = await get_integration(api.mongo, iid)
    assert doc is not None
    assert test_cipher().decrypt(doc["refreshToken"]) == req.response_json["refresh_token"]


async def test_a_refresh_already_in_flight_is_not_started_twice(api: Api) -> None:
    iid, _ = await api.integration()
    api.oauth.script(Hang(0.8))
    first_status, first, _ = await api.post(api.tenant_a, iid)
    assert first_status == 202
    await wait_for(lambda: len(token_requests(api.oauth)) == 1, message="request in flight")
    status, second, _ = await api.post(api.tenant_a, iid)
    assert status == 202
    assert second["data"]["runId"] == first["data"]["runId"]
    assert second["data"]["state"] == "active"
    run = await finished_run(api.mongo, iid)
    assert run["state"] == "completed"
    assert len(await refresh_runs(api.mongo, iid, FINISHED_OR_RUNNING)) == 1
    assert len(token_requests(api.oauth)) == 1


@pytest.mark.parametrize("who", [OWNER, SUPER, "admin"])
async def test_wait_true_returns_the_outcome(api: Api, who: str) -> None:
    iid, _ = await api.integration()
    t0 = utcnow()

    status, body, _ = await api.post(api.tenant_a, iid, who, "?wait=true")

    assert status == 200, body
    data = body["data"]
    assert (data["state"], data["attempts"], data["error"]) == ("completed", 1, None)
    assert data["result"]["rotated"] is True
    expires = data["result"]["expiresAt"]
    assert expires >= (t0 + timedelta(seconds=3600)).isoformat()[:19]


@pytest.mark.parametrize("who", [OWNER, "admin"])
async def test_wait_true_reports_a_permanent_failure(api: Api, who: str) -> None:
    iid, rt = await api.integration()
    api.oauth.revoke(rt)

    status, body, _ = await api.post(api.tenant_a, iid, who, query="?wait=1")

    assert status == 200
    data = body["data"]
    assert data["state"] == "failed" and data["attempts"] == 1
    assert data["error"]["permanent"] is True
    if who == "admin":  # the scrubbed provider text
        assert "invalid_grant" in data["error"]["message"]
    else:  # the tenant owner: what happened and what to do, no internals
        assert data["error"] == {"code": "refresh/grant-refused", "permanent": True,
                                 "message": "The provider no longer accepts this connection's "
                                            "authorization: reconnect the integration."}
    doc = await get_integration(api.mongo, iid)
    assert doc is not None and doc["status"] == "expired"


async def test_no_credentials_is_401(api: Api) -> None:
    iid, _ = await api.integration()
    for headers in ({}, {"Authorization": "Bearer not-a-known-token"},
                    {"Authorization": "Basic b3BzOnNlY3JldA=="}):
        status, body, _ = await api.post(api.tenant_a, iid, None, headers=headers)
        assert status == 401, headers
        assert body == {"success": False, "error": {"code": "auth/unauthorized",
                                                    "message": body["error"]["message"]}}
    assert token_requests(api.oauth) == []


async def test_other_users_get_403(api: Api) -> None:
    iid, _ = await api.integration()
    for who in (STRANGER, OTHER_OWNER):
        status, body, _ = await api.post(api.tenant_a, iid, who)
        assert (status, body["error"]["code"]) == (403, "auth/forbidden"), who
    # the owner of A cannot reach B's integration through B's path either
    b_iid, _ = await api.integration(api.tenant_b)
    status, _, _ = await api.post(api.tenant_b, b_iid, OWNER)
    assert status == 403
    assert token_requests(api.oauth) == []
    assert await refresh_runs(api.mongo, iid, ("waiting", "active", "completed")) == []


@pytest.mark.parametrize("who", [OWNER, "admin"])
async def test_unknown_or_foreign_integration_is_404(api: Api, who: str) -> None:
    b_iid, _ = await api.integration(api.tenant_b)
    for integration in (new_hex_id(), b_iid):
        status, body, _ = await api.post(api.tenant_a, integration, who)
        assert (status, body["error"]["code"]) == (404, "integration/not-found"), integration
    assert token_requests(api.oauth) == []
    assert await refresh_runs(api.mongo, b_iid, ("waiting", "active", "completed")) == []


@pytest.mark.parametrize(("tenant", "integration", "query"), [
    ("bad.tenant", "VALID", ""),
    ("x" * 65, "VALID", ""),
    ("TENANT", "a%24b", ""),
    ("TENANT", "with%20space", ""),
    ("TENANT", "VALID", "?wait=maybe"),
    ("TENANT", "VALID", "?wait="),
], ids=["dot-in-tenant", "tenant-too-long", "dollar-in-integration", "space-in-integration",
        "wait-maybe", "wait-empty"])
async def test_malformed_ids_or_wait_are_400(api: Api, tenant: str, integration: str,
                                             query: str) -> None:
    iid, _ = await api.integration()
    tenant = api.tenant_a if tenant == "TENANT" else tenant
    integration = iid if integration == "VALID" else integration
    status, body, _ = await api.post(tenant, integration, "admin", query)
    assert status == 400, body
    assert body["success"] is False and body["error"]["code"].startswith("validation/")
    assert token_requests(api.oauth) == []


@pytest.mark.parametrize("case", ["revoked", "not-connected"])
async def test_revoked_or_unconnected_integration_is_refused(api: Api, case: str) -> None:
    if case == "revoked":
        iid, _ = await api.integration(status="revoked")
    else:
        iid, _ = await api.integration(refresh_token=ABSENT, access_token=ABSENT,
                                       expires_in=None)
    before = await get_integration(api.mongo, iid)
    status, body, _ = await api.post(api.tenant_a, iid, query="?wait=true")
    assert status == 409, body
    assert token_requests(api.oauth) == []
    assert await get_integration(api.mongo, iid) == before
    assert await refresh_runs(api.mongo, iid) == []


async def test_503_when_refresh_is_disabled(mongo: Mongo) -> None:
    settings = make_settings(refresh={"enabled": False},
                             admin={"tokens": [{"name": "ops", "sha256": hashlib.sha256(
                                 ADMIN_TOKEN.encode()).hexdigest()}]})
    async with running(mongo, settings) as daemon:
        url = f"http://127.0.0.1:{daemon.port}" + PATH.format(tenant=new_hex_id(),
                                                              integration=new_hex_id())
        async with aiohttp.ClientSession() as http, http.post(
                url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
            assert resp.status == 503
            assert (await resp.json())["error"]["code"] == "refresh/disabled"


# -- audit and secrecy -------------------------------------------------------------------------


def audit_events(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.audit_event for r in caplog.records
            if r.name == "mwapjobs.audit" and hasattr(r, "audit_event")]


async def test_an_audit_line_is_written_per_refresh_request(
        api: Api, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    iid, _ = await api.integration()
    status, body, _ = await api.post(api.tenant_a, iid,
                                     headers={"X-Correlation-Id": "corr-refresh-1"})
    assert status == 202
    await api.post(api.tenant_a, iid, STRANGER)  # refused: no audit line
    [event] = audit_events(caplog)
    assert event["level"] == "audit"
    assert event["action"] == "integration.refresh"
    assert event["actor"] == f"user:{OWNER}"
    assert event["target"] == f"integration:{iid}"
    assert event["tenantId"] == api.tenant_a
    assert event["runId"] == body["data"]["runId"]
    assert event["correlationId"] == "corr-refresh-1"
    [record] = [r for r in caplog.records if r.name == "mwapjobs.audit"]
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "audit" and line["action"] == "integration.refresh"

    caplog.clear()
    other, _ = await api.integration()  # `iid` may be refreshed already: in its cooldown
    status, _, _ = await api.post(api.tenant_a, other, "admin")
    assert status == 202
    assert [e["actor"] for e in audit_events(caplog)] == ["token:ops"]


async def test_no_token_or_secret_in_responses_or_logs(
        api: Api, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    # Whatever the level, pymongo's loggers stay at WARNING: this is the very check
    # pymongo makes before it writes a command or reply into the log (on the wire lane
    # those replies carry the stored ciphertexts, which the loop below would find).
    for name in PYMONGO_LOGGERS:
        assert not logging.getLogger(name).isEnabledFor(logging.INFO), name
    good, good_rt = await api.integration()
    bad, bad_rt = await api.integration()
    api.oauth.revoke(bad_rt)
    before = {i: await get_integration(api.mongo, i) for i in (good, bad)}

    texts = []
    for iid in (good, bad):
        status, _, text = await api.post(api.tenant_a, iid, query="?wait=true")
        assert status == 200
        texts.append(text)
    for iid in (good, bad):
        status, _, text = await api.post(api.tenant_a, iid, "admin")
        texts.append(text)

    async def all_finished() -> bool:  # the next refreshes, scheduled for later, aside
        return not await refresh_runs(api.mongo, None, ("waiting", "active"))

    await wait_for(all_finished, message="every refresh run finished")

    after = await get_integration(api.mongo, good)
    assert after is not None
    answers = [r.response_json for r in token_requests(api.oauth)]
    secrets = {good_rt, bad_rt, SECRET, "at-before", test_cipher().decrypt(after["accessToken"]),
               after["accessToken"], after["refreshToken"]}
    secrets |= {a[k] for a in answers if isinstance(a, dict)
                for k in ("access_token", "refresh_token") if k in a}
    for doc in before.values():
        assert doc is not None
        secrets |= {doc["accessToken"], doc["refreshToken"]}
    provider = await api.mongo.call(lambda db: db["cloudProviders"].find_one())
    secrets.add(provider["clientSecret"])

    # the daemon's records; the test token endpoint (Authlib, werkzeug) logs its own tokens
    ours = [r for r in caplog.records if not r.name.startswith(TEST_SERVER_LOGGERS)]
    logged = [r.getMessage() + " " + repr(vars(r)) for r in ours]
    formatted = [JsonFormatter().format(r) for r in ours]
    assert logged, "expected some log records"
    chatter = [r for r in ours if r.name.startswith("pymongo") and r.levelno < logging.WARNING]
    assert chatter == []
    for secret in secrets:
        for text in texts:
            assert secret not in text
        for line in logged + formatted:
            assert secret not in line, line


# -- log lines ---------------------------------------------------------------------------------


class JsonStdout:
    """The daemon's real logging (`setup_logging`), writing to a stdout of our own."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch
        self.out = io.StringIO()

    def setup(self, level: str = "debug") -> None:
        self.monkeypatch.setattr(sys, "stdout", self.out)  # where the handler will write
        setup_logging(level)

    def lines(self) -> list[Any]:
        stop_logging()  # the listener thread writes everything queued, then stops
        return [json.loads(line) for line in self.out.getvalue().splitlines()]


@pytest.fixture
def json_stdout(monkeypatch: pytest.MonkeyPatch) -> Iterator[JsonStdout]:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    capture = JsonStdout(monkeypatch)
    capture.setup()
    try:
        yield capture
    finally:
        stop_logging()
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)


def test_pymongo_never_logs_below_warning_whatever_the_level(
        json_stdout: JsonStdout) -> None:
    stray = logging.getLogger("pymongo.command")
    stray.setLevel(logging.DEBUG)  # someone set it lower: setup_logging puts it back
    json_stdout.setup("debug")
    for name in PYMONGO_LOGGERS:
        assert not logging.getLogger(name).isEnabledFor(logging.INFO), name
    reply = '{"reply": {"refreshToken": "c2VjcmV0:Y2lwaGVy:dGV4dA=="}}'
    logging.getLogger("pymongo.command").debug(reply)
    logging.getLogger("pymongo.connection").info("Connection checked out")
    # and should a record get past the levels (a handler's filter drops it):
    record = logging.makeLogRecord({"name": "pymongo.command", "levelno": logging.DEBUG,
                                    "levelname": "DEBUG", "msg": reply})
    for handler in logging.getLogger().handlers:
        handler.handle(record)
    logging.getLogger("pymongo.topology").warning("pymongo warnings still get through")
    logging.getLogger("mwapjobs.test").debug("ours at debug still get through")
    lines = json_stdout.lines()
    assert [(line["logger"], line["message"]) for line in lines] == [
        ("pymongo.topology", "pymongo warnings still get through"),
        ("mwapjobs.test", "ours at debug still get through"),
    ]


def test_secrets_inside_string_values_are_scrubbed_before_encoding(
        json_stdout: JsonStdout) -> None:
    """A provider's error text quoting JSON: once encoded, its quotes are escaped
    (`{\\"refresh_token\\": \\"abc\\"}`), which a pass over the line alone missed."""
    secrets.add("registered-secret-value-42")
    provider_error = ('invalid_grant: {"refresh_token": "rt-abc-123", "access_token": '
                      '"at-xyz-789", "note": "kept"}')
    log = logging.getLogger("mwapjobs.test")
    log.warning("refresh refused: %s", provider_error, extra={
        "error": {"message": provider_error, "type": "PermanentError"},
        "history": [{"detail": provider_error}, "Bearer abc.def.ghi"],
        "refreshToken": "rt-plain-456", "clientSecret": {"nested": "cs-789"},
        "hasToken": True, "tokenExpiresAt": "2026-12-01T10:00:00+00:00",
        "mixed": 'registered-secret-value-42 with "quotes"',
    })
    [line] = json_stdout.lines()
    text = json.dumps(line)
    for secret in ("rt-abc-123", "at-xyz-789", "rt-plain-456", "cs-789", "abc.def.ghi",
                   "registered-secret-value-42"):
        assert secret not in text, secret
    assert line["error"]["message"] == (
        'invalid_grant: {"refresh_token": "[redacted]", "access_token": "[redacted]", '
        '"note": "kept"}')
    assert line["message"] == "refresh refused: " + line["error"]["message"]
    assert line["history"] == [{"detail": line["error"]["message"]}, "Bearer [redacted]"]
    assert (line["refreshToken"], line["clientSecret"]) == ("[redacted]", "[redacted]")
    assert line["hasToken"] is True  # says whether there is one, which is no secret
    assert line["tokenExpiresAt"] == "2026-12-01T10:00:00+00:00"
    assert line["mixed"] == '[redacted] with "quotes"'


def test_the_final_pass_catches_escaped_quotes_too() -> None:
    """The last pass over the encoded line also knows JSON's escaped quotes."""
    encoded = json.dumps({"message": '{"refresh_token": "abc123", "password": "p4ss"}'})
    assert "abc123" not in secrets.scrub(encoded) and "p4ss" not in secrets.scrub(encoded)


def test_datetimes_in_log_lines_are_iso_8601(json_stdout: JsonStdout) -> None:
    retry_at = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
    logging.getLogger("mwapjobs.engine").info("job will be retried", extra={
        "retryAt": retry_at, "day": date(2026, 12, 1),
        "error": {"at": retry_at + timedelta(microseconds=5)}, "tries": [retry_at],
    })
    [line] = json_stdout.lines()
    assert line["retryAt"] == "2026-12-01T10:00:00+00:00"
    assert datetime.fromisoformat(line["retryAt"]) == retry_at
    assert line["day"] == "2026-12-01"
    assert line["error"]["at"] == "2026-12-01T10:00:00.000005+00:00"
    assert line["tries"] == ["2026-12-01T10:00:00+00:00"]
    assert datetime.fromisoformat(line["timestamp"]).tzinfo is not None


async def test_a_tenant_cannot_spend_the_shared_client_in_a_loop(api: Api) -> None:
    """One manual refresh per integration per refresh.manual_cooldown: calls in a loop
    make one token request, and the rest are told when to come back."""
    iid, _ = await api.integration()
    statuses: list[int] = []
    retry_after: set[str] = set()
    for _ in range(20):
        status, body, _ = await api.post(api.tenant_a, iid, OWNER, "?wait=true")
        statuses.append(status)
        if status == 429:
            assert body["error"]["code"] == "refresh/too-soon"
            retry_after.add(body["error"]["message"])
    assert statuses[0] == 200
    assert set(statuses[1:]) == {429}
    assert len(token_requests(api.oauth)) == 1
    url = api.base + PATH.format(tenant=api.tenant_a, integration=iid)
    async with aiohttp.ClientSession() as http, http.post(
            url, headers=api.bearer(OWNER)) as resp:
        assert resp.status == 429
        assert 0 < int(resp.headers["Retry-After"]) <= 60
