"""Seed and read MWAP's own documents the way the Node backend writes them.

Everything goes through `mongo.call(lambda db: ...)`, so the helpers work on
the embedded store and on a real MongoDB alike. Shapes follow
/work/shared/mwap-data-model.md:

- `cloudProviders`: `_id` ObjectId, `tokenUrl`, `clientId`, `clientSecret`
  encrypted in MWAP's format (or plaintext, as older documents hold it),
  `tokenMethod`, free-form `metadata`;
- `cloudProviderIntegrations`: `_id` a 24-hex *string* (the backend's
  `new ObjectId().toString()`), `tenantId` and `providerId` hex strings,
  `accessToken`/`refreshToken` encrypted (or plaintext, as the backend's PATCH
  writes them), `tokenExpiresAt` a Date, `status`, `updatedAt`...;
- `tenants`: `_id` ObjectId, `ownerId` an Auth0 `sub`;
- `superadmins`: `{userId: sub}`.

    cipher = test_cipher()
    provider = await insert_provider(mongo, cipher, token_url=oauth.token_url,
                                     client_id="cid", client_secret="s3cret")
    integration = await insert_integration(mongo, cipher, provider=provider,
                                           tenant_id=tenant, refresh_token=rt,
                                           expires_in=600)
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from bson import ObjectId
from pymongo.errors import BulkWriteError

from mwapjobs.crypto import MwapCipher
from mwapjobs.storage.mongo import Mongo
from mwapjobs.storage.names import (
    INTEGRATION_STATE,
    INTEGRATIONS,
    NOTIFICATIONS,
    PROVIDERS,
    RUNS,
    SUPERADMINS,
    TENANTS,
)

TEST_ENCRYPTION_KEY = "0123456789abcdef0123456789abcdef"  # the same as tests/conftest.py
_slugs = itertools.count(1)

# Sentinel: leave a field out of the document entirely.
ABSENT: Any = object()


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def test_cipher() -> MwapCipher:
    return MwapCipher(TEST_ENCRYPTION_KEY)


test_cipher.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def new_hex_id() -> str:
    """An id as the backend makes it: `new ObjectId().toString()`."""
    return str(ObjectId())


@dataclass(frozen=True)
class SeededProvider:
    id: ObjectId
    client_id: str
    client_secret: str  # plaintext, for assertions
    token_url: str

    @property
    def hex(self) -> str:
        return str(self.id)


# -- providers ---------------------------------------------------------------


def provider_doc(cipher: MwapCipher, *, token_url: str, client_id: str, client_secret: str,
                 encrypt_secret: bool = True, token_method: str | None = None,
                 metadata: dict[str, Any] | None = None, name: str | None = None,
                 **extra: Any) -> dict[str, Any]:
    n = next(_slugs)
    now = utcnow()
    doc: dict[str, Any] = {
        "_id": ObjectId(),
        "name": name or f"Provider {n}",
        "slug": f"provider-{n}",
        "scopes": ["files.read"],
        "authUrl": "https://provider.invalid/oauth/authorize",
        "tokenUrl": token_url,
        "clientId": client_id,
        "clientSecret": cipher.encrypt(client_secret) if encrypt_secret else client_secret,
        "grantType": "authorization_code",
        "metadata": metadata if metadata is not None else {"providerType": "test"},
        "createdAt": now,
        "updatedAt": now,
    }
    if token_method is not None:
        doc["tokenMethod"] = token_method
    doc.update(extra)
    return doc


async def insert_provider(mongo: Mongo, cipher: MwapCipher, *, token_url: str,
                          client_id: str, client_secret: str, **options: Any) -> SeededProvider:
    """Insert a `cloudProviders` document (secret encrypted unless `encrypt_secret=False`)."""
    doc = provider_doc(cipher, token_url=token_url, client_id=client_id,
                       client_secret=client_secret, **options)
    await mongo.call(lambda db: db[PROVIDERS].insert_one(doc))
    return SeededProvider(doc["_id"], client_id, client_secret, token_url)


# -- integrations --------------------------------------------------------------


def integration_doc(cipher: MwapCipher | None, *, provider: SeededProvider | str,
                    tenant_id: str, refresh_token: str | None = "rt-seed",
                    access_token: str | None = "at-seed", expires_in: float | None = 3600.0,
                    token_expires_at: datetime | None = None, status: str = "active",
                    encrypt: bool = True, integration_id: Any = None,
                    updated_at: datetime | None = None, now: datetime | None = None,
                    **extra: Any) -> dict[str, Any]:
    """A `cloudProviderIntegrations` document.

    `refresh_token=None` stores `null`; `refresh_token=ABSENT` leaves the field
    out (both mean "not connected"). `expires_in=None` and no
    `token_expires_at` leaves `tokenExpiresAt` out (before the first connection).
    `encrypt=False` stores plaintext tokens, as the backend's PATCH does.
    """
    now = now or utcnow()
    provider_id = provider.hex if isinstance(provider, SeededProvider) else provider

    def stored(value: str | None) -> str | None:
        if value is None or not encrypt or cipher is None:
            return value
        return cipher.encrypt(value)

    doc: dict[str, Any] = {
        "_id": integration_id if integration_id is not None else new_hex_id(),
        "tenantId": tenant_id,
        "providerId": provider_id,
        "scopesGranted": ["files.read"],
        "status": status,
        "connectedAt": now,
        "createdAt": now,
        "updatedAt": updated_at or now,
        "createdBy": "auth0|seed",
        "metadata": {},
    }
    if access_token is not ABSENT:
        doc["accessToken"] = stored(access_token)
    if refresh_token is not ABSENT:
        doc["refreshToken"] = stored(refresh_token)
    if token_expires_at is not None:
        doc["tokenExpiresAt"] = token_expires_at
    elif expires_in is not None:
        doc["tokenExpiresAt"] = now + timedelta(seconds=expires_in)
    doc.update(extra)
    return doc


async def insert_integration(mongo: Mongo, cipher: MwapCipher | None, **options: Any) -> str:
    """Insert one integration (see `integration_doc`); returns its `_id` as a string."""
    doc = integration_doc(cipher, **options)
    await mongo.call(lambda db: db[INTEGRATIONS].insert_one(doc))
    return str(doc["_id"])


async def insert_all(mongo: Mongo, collection: str, docs: Sequence[dict[str, Any]],
                     batch: int = 1000) -> None:
    """Insert `docs` (each with its `_id`) in batches, idempotently. On a slow wire server
    a batch can outlast the socket timeout after it was applied; the driver then retries
    it as a retryable write, and a server that does not recognise the retry answers with
    duplicate `_id`s. Those are the seed's own documents, already in: not an error."""
    for start in range(0, len(docs), batch):
        chunk = list(docs[start:start + batch])
        try:
            await mongo.call(lambda db, chunk=chunk: db[collection].insert_many(
                chunk, ordered=False))
        except BulkWriteError as exc:
            if any(e.get("code") != 11000 for e in exc.details.get("writeErrors", [])) or \
                    exc.details.get("writeConcernErrors"):
                raise


async def insert_integrations(mongo: Mongo, docs: Sequence[dict[str, Any]],
                              batch: int = 5000) -> None:
    await insert_all(mongo, INTEGRATIONS, docs, batch)


async def get_integration(mongo: Mongo, integration_id: Any) -> dict[str, Any] | None:
    doc: dict[str, Any] | None = await mongo.call(
        lambda db: db[INTEGRATIONS].find_one({"_id": integration_id}))
    return doc


async def update_integration(mongo: Mongo, integration_id: Any, fields: dict[str, Any],
                             *, touch: bool = True, unset: Sequence[str] = ()) -> None:
    """`$set` fields as the backend would (bumping `updatedAt` unless `touch=False`)."""
    update: dict[str, Any] = {"$set": {**({"updatedAt": utcnow()} if touch else {}), **fields}}
    if unset:
        update["$unset"] = {name: "" for name in unset}
    if not update["$set"]:
        del update["$set"]
    await mongo.call(lambda db: db[INTEGRATIONS].update_one({"_id": integration_id}, update))


async def delete_integration(mongo: Mongo, integration_id: Any) -> None:
    await mongo.call(lambda db: db[INTEGRATIONS].delete_one({"_id": integration_id}))


# -- tenants and roles -----------------------------------------------------------


async def insert_tenant(mongo: Mongo, owner_id: str, name: str | None = None) -> str:
    """Insert a tenant (ObjectId `_id`, `ownerId` = Auth0 sub); returns its hex id."""
    oid = ObjectId()
    now = utcnow()
    doc = {"_id": oid, "name": name or f"Tenant {oid}", "ownerId": owner_id,
           "settings": {}, "archived": False, "createdAt": now, "updatedAt": now}
    await mongo.call(lambda db: db[TENANTS].insert_one(doc))
    return str(oid)


async def insert_superadmin(mongo: Mongo, user_id: str) -> None:
    doc = {"_id": ObjectId(), "userId": user_id, "createdAt": utcnow()}
    await mongo.call(lambda db: db[SUPERADMINS].insert_one(doc))


# -- what mwapjobs wrote -------------------------------------------------------------


async def integration_state(mongo: Mongo, integration_id: str) -> dict[str, Any] | None:
    """mwapjobs' own notes on an integration (`mwapjobs_integrations`)."""
    doc: dict[str, Any] | None = await mongo.call(
        lambda db: db[INTEGRATION_STATE].find_one({"_id": integration_id}))
    return doc


async def notifications(mongo: Mongo, integration_id: str | None = None) -> list[dict[str, Any]]:
    query = {} if integration_id is None else {"integrationId": integration_id}
    docs: list[dict[str, Any]] = await mongo.call(
        lambda db: db[NOTIFICATIONS].find(query).to_list(None))
    return docs


async def refresh_runs(mongo: Mongo, integration_id: str | None = None,
                       states: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Runs of the `token-refresh` queue (for one integration, in some states)."""
    query: dict[str, Any] = {"queue": "token-refresh"}
    if integration_id is not None:
        query["jobId"] = f"integration:{integration_id}"
    if states is not None:
        query["state"] = {"$in": list(states)}
    docs: list[dict[str, Any]] = await mongo.call(lambda db: db[RUNS].find(query).to_list(None))
    return docs


async def pending_refresh_runs(mongo: Mongo,
                               integration_id: str | None = None) -> list[dict[str, Any]]:
    return await refresh_runs(mongo, integration_id, ("delayed", "waiting", "active"))
