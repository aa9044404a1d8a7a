"""What the health-check tests share: simulated provider APIs, a real OAuth token
endpoint and an in-process daemon on the test's database.

The daemon runs in-process on the embedded store (or the wire lane's server) with a local
aiohttp server playing Dropbox, Google Drive, Microsoft Graph and a generic API
(tests/support/providers.py) and Authlib's token endpoint
(tests/support/oauth_server.py) for the refreshes a 401 sets off. MWAP's
documents are seeded as the backend writes them (tests/support/mwap_data.py).

- fixtures: `oauth_server` (module-scoped), `oauth` (reset around each test, with the
  client `CID`), `providers` (a `ProviderServer`), `w` (a `World`), `api` (a `World`
  whose daemon also accepts the users of a local JWKS identity provider);
- `World`: seeds integrations, runs a sweep (`HealthChecker.sweep`, awaited, so a test
  sees every write of the sweep when it returns), reads what it wrote, calls the HTTP API;
- `world(...)`: a `World` with other health settings or another provider server;
- `closed_port()`: a port nobody listens on.

The fixtures are named like those of the token-refresh tests that tests/conftest.py
loads (`oauth_server`, `oauth`), so a test module binds them as its own:
`oauth_server, oauth = health_world.oauth_server, health_world.oauth`.
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from mwapjobs.api.auth import Authenticator
from mwapjobs.daemon import Daemon
from mwapjobs.jobs.health.sweep import HealthChecker, SweepReport
from mwapjobs.storage.identity import IdentityStore
from mwapjobs.storage.mongo import Mongo
from tests.conftest import make_settings, wait_for
from tests.support.jwks import JwksServer
from tests.support.mwap_data import (
    ABSENT,
    SeededProvider,
    get_integration,
    insert_integration,
    insert_provider,
    insert_tenant,
    integration_state,
    test_cipher,
)
from tests.support.oauth_server import OAuthServer
from tests.support.providers import KINDS, ProviderServer

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



@pytest.fixture
async def api(mongo: Mongo, oauth: OAuthServer,
              providers: ProviderServer) -> AsyncIterator[World]:
    async with JwksServer() as idp, world(mongo, oauth, providers, idp) as it:
        yield it


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port
