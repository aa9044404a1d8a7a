"""Health checks, the probes alone: which request each provider gets, and how its answer
is classified (tests/support/providers.py plays the provider APIs)."""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp
import pytest

from mwapjobs.jobs.health import probes
from mwapjobs.jobs.health.probes import ProbeSpec, classify, probe, probe_spec, provider_kind
from tests.support import health_world
from tests.support.health_world import closed_port
from tests.support.providers import KINDS, ProviderServer, Reply

# This module's fixture (tests/support/health_world.py).
providers = health_world.providers


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
