"""What the token-refresh tests share: a real Authlib token endpoint, MWAP's documents
seeded as the backend writes them, and an in-process daemon.

tests/conftest.py loads its fixtures (`pytest_plugins`); a test module imports the
helpers it uses:

- fixtures: `oauth_server` (module-scoped, with a meter of requests in flight),
  `oauth` (reset around each test), `tls_server` (a certificate nobody trusts),
  `world` (a `World` on the test's database);
- `World`: seeds a provider (a client at the token endpoint and its `cloudProviders`
  document) and integrations holding refresh tokens the server accepts;
- the token endpoint: `token_requests`, `issued`, `meter`;
- the daemon: `daemon_settings`, `running`, `finished_run`, `DiscoveryPasses`;
- what a refresh wrote: `changed_fields`, `close_to`, `hold_of`, `provider_doc_of`,
  `assert_given_up`.

The MWAP documents are seeded as the backend writes them (tests/support/mwap_data.py):
tokens and client secrets encrypted with MwapCipher, except where a case is about
plaintext values written by the backend's PATCH.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pytest

from mwapjobs.config import Settings
from mwapjobs.crypto import MwapCipher
from mwapjobs.daemon import Daemon
from mwapjobs.jobs.refresh.discovery import RefreshSync, SyncReport
from mwapjobs.jobs.refresh.runs import QUEUE, fingerprint
from mwapjobs.outbound import UrlPolicy
from mwapjobs.storage.integrations import IntegrationStore
from mwapjobs.storage.mongo import Mongo
from mwapjobs.storage.providers import ProviderHolds
from tests.conftest import make_settings, wait_for
from tests.support.mwap_data import (
    SeededProvider,
    as_utc,
    get_integration,
    insert_integration,
    insert_provider,
    integration_state,
    new_hex_id,
    notifications,
    refresh_runs,
    test_cipher,
)
from tests.support.oauth_server import OAuthServer

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
        app = server.app  # the Flask app: wrap its WSGI callable, the usual middleware hook
        app.wsgi_app = InFlightMeter(app.wsgi_app)  # type: ignore[method-assign]
        yield server


@pytest.fixture
def oauth(oauth_server: OAuthServer) -> Iterator[OAuthServer]:
    oauth_server.reset()
    meter(oauth_server).reset()
    yield oauth_server
    oauth_server.reset()  # wakes any handler still hanging


@pytest.fixture(scope="module")
def tls_server() -> Iterator[OAuthServer]:
    with OAuthServer(tls=True) as server:
        yield server


def meter(server: OAuthServer) -> InFlightMeter:
    wrapped = server.app.wsgi_app
    assert isinstance(wrapped, InFlightMeter)
    return wrapped


def token_requests(server: OAuthServer) -> list[Any]:
    return [r for r in server.requests if r.path == "/oauth/token"]


def issued(server: OAuthServer) -> dict[str, Any]:
    """What the server answered to the last token request."""
    body = token_requests(server)[-1].response_json
    assert isinstance(body, dict)
    return body


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


# -- what a refresh wrote -------------------------------------------------------------------


def changed_fields(before: dict[str, Any], after: dict[str, Any]) -> set[str]:
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


def close_to(stored: datetime, low: datetime, high: datetime) -> bool:
    return low - MS <= as_utc(stored) <= high + MS


async def hold_of(world: World, provider: SeededProvider) -> dict[str, Any] | None:
    state = await ProviderHolds(world.mongo).state(provider.hex)
    return state.get("hold") if state else None


async def provider_doc_of(world: World, provider: SeededProvider) -> dict[str, Any]:
    doc = await IntegrationStore(world.mongo).provider(provider.hex)
    assert doc is not None
    return doc


async def assert_given_up(world: World, iid: str, before: dict[str, Any], reason: str) -> None:
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


# -- the whole daemon ---------------------------------------------------------------------------


def daemon_settings(queue: dict[str, Any] | None = None, **refresh: Any) -> Settings:
    """Refresh settings for in-process daemons: every seeded token (30 s) is due at once,
    discovery runs at start and then (unless asked) not again, fast backoff. No change
    streams unless asked (`follow_changes=True`; tests/test_change_follow.py): on the
    wire lane they would make discovery see every write at once."""
    base = {"lead": 60, "jitter": 0, "sync_interval": 3600, "request_timeout": 5,
            "provider_concurrency": 4, "provider_rate": 100, "follow_changes": False}
    return make_settings(
        refresh={**base, **refresh},
        queues={QUEUE: queue or {"backoff": {"delay": 0.1, "jitter": 0}}},
    )


@asynccontextmanager
async def running(mongo: Mongo, settings: Settings, *,
                  prepare: Callable[[Daemon], None] | None = None) -> AsyncIterator[Daemon]:
    """A daemon on `mongo`, started and ready; stopped afterwards. `prepare` changes it
    before it starts (e.g. its authenticator)."""
    daemon = Daemon(settings, mongo=mongo)
    if prepare is not None:
        prepare(daemon)
    await daemon.start()
    try:
        await daemon.wait_ready()
        yield daemon
    finally:
        await daemon.stop()


async def finished_run(mongo: Mongo, iid: str, timeout: float = 10.0) -> dict[str, Any]:
    """The one finished (completed or failed) refresh run of `iid`, once there is one."""
    found: list[dict[str, Any]] = []

    async def done() -> bool:
        found[:] = await refresh_runs(mongo, iid, ("completed", "failed"))
        return bool(found)

    await wait_for(done, timeout, message=f"a finished refresh run of {iid}")
    assert len(found) == 1, found
    return found[0]


@dataclass(frozen=True)
class Pass:
    started: float  # time.monotonic(), comparable to RecordedRequest.monotonic
    ended: float
    report: SyncReport


class DiscoveryPasses:
    """Every discovery pass from now on, with its report: a spy on the public
    `RefreshSync.sync_once`, which the daemon's discovery loop calls each pass."""

    def __init__(self, discovery: RefreshSync, monkeypatch: pytest.MonkeyPatch) -> None:
        self.passes: list[Pass] = []
        real = discovery.sync_once

        async def sync_once(full: bool | None = None) -> SyncReport:
            started = time.monotonic()
            report = await real(full)
            self.passes.append(Pass(started, time.monotonic(), report))
            return report

        monkeypatch.setattr(discovery, "sync_once", sync_once)

    def __len__(self) -> int:
        return len(self.passes)

    def between(self, start: float, end: float) -> list[SyncReport]:
        """The reports of the passes made entirely between two monotonic times."""
        return [p.report for p in self.passes if start < p.started and p.ended < end]
