"""A daemon with file indexing on, against the file-API simulators
(tests/support/file_providers.py) and Authlib's token endpoint
(tests/support/oauth_server.py), with MWAP's projects seeded as the backend writes them.

    async with files_world(mongo, oauth, sim) as w:
        p = await w.project("dropbox", "/Projects/A")       # provider, integration, project
        w.tree("dropbox").add("/Projects/A/a.pdf")
        run = await w.index(p)                              # one pass through the queue
        docs = await w.files(p)                             # its virtualFiles documents
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from bson import ObjectId

from mwapjobs.api.auth import Authenticator
from mwapjobs.daemon import Daemon
from mwapjobs.jobs.files import FileIndexer
from mwapjobs.jobs.files.schedule import QUEUE, job_id
from mwapjobs.storage.identity import IdentityStore
from mwapjobs.storage.mongo import Mongo
from mwapjobs.storage.names import FILE_INDEX, PROJECTS, VIRTUAL_FILES
from tests.conftest import make_mongo, make_settings
from tests.support.file_providers import FileProviderServer
from tests.support.file_tree import Tree
from tests.support.jwks import JwksServer
from tests.support.mwap_data import (
    SeededProvider,
    insert_integration,
    insert_provider,
    insert_tenant,
    test_cipher,
    utcnow,
)
from tests.support.oauth_server import OAuthServer

CID, SECRET = "files-client", "s3cret-files"
OWNER = "auth0|files-owner"
ADMIN_TOKEN = "mwapjobs-admin-token-for-file-tests-0123456789"
KIND_TAGS = {"dropbox": "dbx", "google": "gdrive", "microsoft": "graph"}
_tokens = itertools.count(1)


@dataclass
class Project:
    id: str
    tenant: str
    integration: str
    kind: str
    access_token: str
    stored_id: Any  # the `_id` as stored (a string, or an ObjectId)


@dataclass
class FilesWorld:
    daemon: Daemon
    mongo: Mongo
    oauth: OAuthServer
    sim: FileProviderServer
    tenant: str
    providers: dict[str, SeededProvider] = field(default_factory=dict)
    idp: JwksServer | None = None

    def user(self, sub: str = OWNER) -> str:
        """An Auth0 access token of `sub` (the tenant's owner by default)."""
        assert self.idp is not None, "module_world(users=True)"
        return self.idp.token(sub)

    @property
    def indexer(self) -> FileIndexer:
        job = self.daemon.jobs["files"]
        assert job is not None
        return job  # type: ignore[no-any-return]

    def tree(self, kind: str) -> Tree:
        return self.sim.tree(KIND_TAGS[kind])

    async def project(self, kind: str, folder: str, *, object_ids: bool = False,
                      status: str = "active", archived: bool = False,
                      tenant: str | None = None, integration: str | None = None,
                      access_token: str | None = None) -> Project:
        """A project on a connected integration of `kind` (a new integration unless
        `integration` names one). `object_ids`: the project's `_id`, `tenantId` and
        `cloudIntegrationId`, and the integration's `_id`, as ObjectIds (older
        documents), instead of the backend's hex strings."""
        tenant = tenant or self.tenant
        token = access_token or f"at-{kind}-{next(_tokens)}"
        if integration is None:
            integration = await insert_integration(
                self.mongo, test_cipher(), provider=self.providers[kind], tenant_id=tenant,
                status=status, access_token=token,
                refresh_token=self.oauth.issue_refresh_token(CID),
                integration_id=ObjectId() if object_ids else None)
        pid = ObjectId()
        stored: Any = pid if object_ids else str(pid)
        now = utcnow()
        doc = {"_id": stored, "tenantId": ObjectId(tenant) if object_ids else tenant,
               "projectTypeId": str(ObjectId()),
               "cloudIntegrationId": ObjectId(integration) if object_ids else integration,
               "folderpath": folder, "name": f"Project {pid}", "description": "",
               "archived": archived, "members": [{"userId": OWNER, "role": "OWNER"}],
               "createdAt": now, "updatedAt": now, "createdBy": OWNER}
        await self.mongo.call(lambda db: db[PROJECTS].insert_one(doc))
        return Project(str(pid), tenant, integration, kind, token, stored)

    async def index(self, project: Project, mode: str = "auto",
                    timeout: float = 20.0) -> dict[str, Any]:
        """One pass through the `file-index` queue, awaited; the run document."""
        added = await self.daemon.engine.add(QUEUE, {"projectId": project.id, "mode": mode},
                                             job_id=job_id(project.id), replace=True)
        run = await added.settled(timeout)
        assert run is not None
        return run

    async def files(self, project: Project) -> dict[str, dict[str, Any]]:
        """The project's virtualFiles documents by path."""
        docs = await self.mongo.call(lambda db: db[VIRTUAL_FILES].find(
            {"projectId": project.id}).to_list(None))
        return {d["path"]: d for d in docs}

    async def summary(self, project: Project) -> dict[str, Any]:
        doc = await self.mongo.call(lambda db: db[FILE_INDEX].find_one({"_id": project.id}))
        assert doc is not None
        return dict(doc)

    async def http(self, method: str, path: str, body: Any = None,
                   token: str | None = ADMIN_TOKEN) -> tuple[int, dict[str, Any]]:
        url = f"http://127.0.0.1:{self.daemon.port}{path}"
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with aiohttp.ClientSession() as http, http.request(
                method, url, headers=headers,
                **({"json": body} if body is not None else {})) as resp:
            return resp.status, json.loads(await resp.text())


@asynccontextmanager
async def files_world(mongo: Mongo, oauth: OAuthServer, sim: FileProviderServer,
                      idp: JwksServer | None = None, **files: Any
                      ) -> AsyncIterator[FilesWorld]:
    """`files`: settings of `[files]` over the tests' defaults (pages of 3 items)."""
    oauth.add_client(CID, SECRET)
    tenant = await insert_tenant(mongo, OWNER)
    providers = {}
    for kind, tag in KIND_TAGS.items():
        providers[kind] = await insert_provider(
            mongo, test_cipher(), token_url=oauth.token_url, client_id=CID,
            client_secret=SECRET, metadata=sim.metadata(kind, tag), name=f"Files {kind}")
    settings = make_settings(
        files={"enabled": True, "page_size": 3, "interval": 3600, "provider_rate": 1000,
               "provider_concurrency": 4, "request_timeout": 5, "max_retry_wait": 5, **files},
        health={"enabled": False},
        # Fewer background queries than the tests' defaults: a real server is slow.
        engine={"sweep_interval": 2.0}, mongodb={"ping_interval": 2.0},
        refresh={"lead": 60, "jitter": 0, "sync_interval": 3600, "wait_timeout": 10},
        queues={"file-index": {"backoff": {"delay": 0.05, "jitter": 0}}},
        admin={"tokens": [{"name": "ops",
                           "sha256": hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()}]},
        **({"auth0_domain": "idp.test", "auth0_audience": idp.audience} if idp else {}))
    daemon = Daemon(settings, mongo=mongo)
    jwks = idp.cache() if idp else None
    if jwks is not None:
        daemon.auth = Authenticator(settings, IdentityStore(mongo), jwks)
    await daemon.start()
    try:
        await daemon.wait_ready()
        world = FilesWorld(daemon, mongo, oauth, sim, tenant, providers, idp)
        yield world
    finally:
        await daemon.stop()
        if jwks is not None:
            await jwks.close()


@asynccontextmanager
async def module_world(max_page: int = 3, latency: float = 0.0, users: bool = False,
                       **files: Any) -> AsyncIterator[FilesWorld]:
    """A whole world of its own (database, token endpoint, simulators, daemon), for a
    module-scoped fixture: starting a daemon costs seconds on a real server, so a test
    module shares one and each test works in folders of its own."""
    mongo, drop = make_mongo()
    try:
        with OAuthServer() as oauth:
            async with contextlib.AsyncExitStack() as stack:
                idp = await stack.enter_async_context(JwksServer()) if users else None
                sim = await stack.enter_async_context(
                    FileProviderServer(latency=latency, max_page=max_page))
                yield await stack.enter_async_context(
                    files_world(mongo, oauth, sim, idp, **files))
    finally:
        await mongo.aclose()
        drop()
