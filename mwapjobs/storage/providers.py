"""Provider holds: a provider whose own configuration is broken waits, its tenants do not pay.

When a token endpoint says the *client* is wrong (a wrong client secret, a
token URL that answers 404/405, a TLS failure...), every tenant of that
provider would get the same answer: it is not any tenant's fault, and nothing
a tenant can do fixes it. The refresher then puts the provider *on hold*
instead of touching any integration: its refreshes are postponed, not failed.

The hold is kept in our own collection `mwapjobs_providers` (one document per
provider, `_id` = the provider's hex id), never in the backend's
`cloudProviders`:

    {_id, name, slug,
     hold: {since, error, reason, httpStatus, config, nextProbeAt, lastProbeAt,
            probes, lastSeenAt},
     lastHold: {... the last hold, plus liftedAt, liftedBecause}}

`config` is `config_fingerprint(provider)`: a hash of the provider document's
OAuth fields and `updatedAt`. A hold ends
- as soon as the provider's document changes (another fingerprint: the
  operator fixed the secret or the URL), or
- when a *probe* succeeds: every `nextProbeAt` one refresh is let through to
  test the provider again, claimed with a conditional update so that only one
  run (of any daemon) probes.

Every write is conditional on the fingerprint it is about, so two daemons
never lift or re-arm each other's hold by mistake.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import ASCENDING, ReturnDocument
from pymongo.errors import DuplicateKeyError

from .mongo import Mongo
from .names import INTEGRATIONS, PROVIDER_STATE

CACHE_SECONDS = 1.0  # how long a read hold (or its absence) is reused by this process

# The provider fields that decide how a token request is made: a change to any of them
# (or to `updatedAt`, which the backend bumps on every edit) lifts a hold.
OAUTH_FIELDS = ("tokenUrl", "clientId", "clientSecret", "tokenMethod", "grantType")
OAUTH_METADATA = ("tokenEndpointAuthMethod", "basicAuthEncoding")


def config_fingerprint(provider: dict[str, Any]) -> str:
    """Identifies a provider's OAuth configuration without keeping it (the secret is
    hashed with the rest, never stored)."""
    metadata = provider.get("metadata") or {}
    updated = provider.get("updatedAt")
    parts = [provider.get(name) for name in OAUTH_FIELDS]
    parts += [metadata.get(name) if isinstance(metadata, dict) else None
              for name in OAUTH_METADATA]
    parts.append(_ms(updated) if isinstance(updated, datetime) else updated)
    text = json.dumps(parts, default=str, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Problem:
    """What the token endpoint said that puts a provider on hold (no secret in it)."""

    error: str  # the OAuth error code, or a short kind: "HTTP 404", "tls"
    reason: str  # for operators: at most a few hundred characters, scrubbed
    http_status: int | None = None


@dataclass(frozen=True)
class TokensAtRisk:
    """Refreshable integrations of a held provider whose access token expires."""

    expiring: int  # expire later, unless the hold is lifted first
    earliest: datetime | None
    expired: int  # expired since the hold began


class ProviderHolds:
    """Reads and conditional writes of `mwapjobs_providers`, with a short read cache."""

    def __init__(self, mongo: Mongo, *, cache_seconds: float = CACHE_SECONDS,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._mongo = mongo
        self.cache_seconds = cache_seconds
        self._monotonic = monotonic
        self._cache: dict[str, tuple[float, dict[str, Any] | None]] = {}
        # Bumped before and after every write of ours: a read that overlapped a write
        # may hold what was there before it, and is then not kept (it once was, and the
        # next run sent a request the hold just written should have stopped).
        self._writes = 0

    async def ensure_indexes(self) -> None:
        """Integrations by provider and expiry, for the alert's "tokens at risk" counts."""
        await self._mongo.call(
            lambda db: db[INTEGRATIONS].create_index(
                [("providerId", ASCENDING), ("tokenExpiresAt", ASCENDING)],
                name="mwapjobs_providerId_tokenExpiresAt",
            )
        )

    # -- reads --------------------------------------------------------------------------

    async def get(self, provider_id: str, *, fresh: bool = False,
                  max_age: float | None = None) -> dict[str, Any] | None:
        """The provider's hold, or None; a read is reused for `max_age` s (default
        `cache_seconds`) unless `fresh`. Putting a provider on hold, lifting it or
        claiming its probe forgets the read, so the next `get` asks again."""
        now = self._monotonic()
        cached = self._cache.get(provider_id)
        age = self.cache_seconds if max_age is None else max_age
        if not fresh and cached is not None and now - cached[0] < age:
            return cached[1]
        writes = self._writes
        doc: dict[str, Any] | None = await self._mongo.call(
            lambda db: db[PROVIDER_STATE].find_one({"_id": provider_id}, {"hold": 1})
        )
        hold = doc.get("hold") if doc else None
        hold = hold if isinstance(hold, dict) else None
        if self._writes == writes:
            self._cache[provider_id] = (now, hold)
        return hold

    @contextlib.contextmanager
    def _writing(self, provider_id: str) -> Iterator[None]:
        """Around a write: forget the cached read, and any read overlapping the write."""
        self._writes += 1
        self._cache.pop(provider_id, None)
        try:
            yield
        finally:
            self._writes += 1
            self._cache.pop(provider_id, None)

    async def all(self) -> list[dict[str, Any]]:
        """Every provider on hold: `{_id, name, slug, hold}`."""
        docs: list[dict[str, Any]] = await self._mongo.call(
            lambda db: db[PROVIDER_STATE]
            .find({"hold": {"$exists": True}}, {"lastHold": 0})
            .to_list(None)
        )
        return docs

    async def url_changes(self, since: datetime) -> list[dict[str, Any]]:
        """Providers whose outbound URLs changed at or after `since`:
        `{_id, name, urlsChangedAt, urlChanges: [{field, from, to}]}`."""
        docs: list[dict[str, Any]] = await self._mongo.call(
            lambda db: db[PROVIDER_STATE]
            .find({"urlsChangedAt": {"$gte": since}},
                  {"name": 1, "urlsChangedAt": 1, "urlChanges": 1})
            .to_list(None)
        )
        return docs

    async def known_urls(self) -> dict[str, dict[str, str]]:
        """provider id → the outbound URLs (scheme, host and path) seen last time."""
        docs = await self._mongo.call(
            lambda db: db[PROVIDER_STATE].find({"urls": {"$exists": True}}, {"urls": 1})
            .to_list(None))
        return {str(d["_id"]): d["urls"] for d in docs if isinstance(d.get("urls"), dict)}

    async def record_urls(self, provider: dict[str, Any], urls: dict[str, str],
                          changes: list[dict[str, str]], now: datetime) -> None:
        """Remember a provider's outbound URLs; with `changes`, when and how they moved."""
        fields: dict[str, Any] = {"urls": urls, "name": provider.get("name")}
        if changes:
            fields |= {"urlsChangedAt": now, "urlChanges": changes}
        await self._mongo.call(lambda db: db[PROVIDER_STATE].update_one(
            {"_id": str(provider["_id"])}, {"$set": fields}, upsert=True))

    async def state(self, provider_id: str) -> dict[str, Any] | None:
        doc: dict[str, Any] | None = await self._mongo.call(
            lambda db: db[PROVIDER_STATE].find_one({"_id": provider_id})
        )
        return doc

    async def tokens_at_risk(self, provider_id: str, since: datetime,
                             now: datetime) -> TokensAtRisk:
        """Connected, refreshable integrations of the provider: how many access tokens
        expire while nothing refreshes them, the earliest, and how many already did."""
        base: dict[str, Any] = {"providerId": provider_id,
                                "refreshToken": {"$nin": [None, ""]},
                                "status": {"$ne": "revoked"}}
        future = {**base, "tokenExpiresAt": {"$gt": now}}
        past = {**base, "tokenExpiresAt": {"$gt": since, "$lte": now}}
        expiring = await self._mongo.call(lambda db: db[INTEGRATIONS].count_documents(future))
        first: dict[str, Any] | None = None
        if expiring:
            first = await self._mongo.call(
                lambda db: db[INTEGRATIONS].find_one(
                    future, {"tokenExpiresAt": 1}, sort=[("tokenExpiresAt", ASCENDING)])
            )
        expired = await self._mongo.call(lambda db: db[INTEGRATIONS].count_documents(past))
        earliest = first.get("tokenExpiresAt") if first else None
        return TokensAtRisk(int(expiring), _utc(earliest) if isinstance(earliest, datetime)
                            else None, int(expired))

    # -- writes -----------------------------------------------------------------------------

    async def hold(self, provider: dict[str, Any], problem: Problem, now: datetime,
                   recheck: float) -> bool:
        """Put the provider on hold for its current configuration. True when this call
        started the hold; False when it was already held for this configuration (then
        only the latest reason is recorded)."""
        provider_id = str(provider["_id"])
        config = config_fingerprint(provider)
        hold = {"since": now, "error": problem.error, "reason": problem.reason,
                "httpStatus": problem.http_status, "config": config,
                "nextProbeAt": now + timedelta(seconds=recheck), "lastProbeAt": None,
                "probes": 0, "lastSeenAt": now}
        with self._writing(provider_id):
            try:
                await self._mongo.call(
                    lambda db: db[PROVIDER_STATE].update_one(
                        {"_id": provider_id, "hold.config": {"$ne": config}},
                        {"$set": {"hold": hold, "name": provider.get("name"),
                                  "slug": provider.get("slug")}},
                        upsert=True,
                    )
                )
                return True
            except DuplicateKeyError:  # held already, for this very configuration
                await self._mongo.call(
                    lambda db: db[PROVIDER_STATE].update_one(
                        {"_id": provider_id, "hold.config": config},
                        {"$set": {"hold.error": problem.error, "hold.reason": problem.reason,
                                  "hold.httpStatus": problem.http_status,
                                  "hold.lastSeenAt": now}},
                    )
                )
                return False

    async def claim_probe(self, provider_id: str, config: str, now: datetime,
                          recheck: float) -> bool:
        """Take the re-probe that is due (one caller wins) and arm the next one."""
        with self._writing(provider_id):
            result = await self._mongo.call(
                lambda db: db[PROVIDER_STATE].update_one(
                    {"_id": provider_id, "hold.config": config,
                     "hold.nextProbeAt": {"$lte": now}},
                    {"$set": {"hold.nextProbeAt": now + timedelta(seconds=recheck),
                              "hold.lastProbeAt": now},
                     "$inc": {"hold.probes": 1}},
                )
            )
        return bool(result.modified_count)

    async def lift(self, provider_id: str, config: str | None, now: datetime,
                   because: str) -> dict[str, Any] | None:
        """End the hold (only the one for `config`, when given). Returns the hold that
        this call ended, or None if there was none (or another caller ended it)."""
        query: dict[str, Any] = {"_id": provider_id, "hold": {"$exists": True}}
        if config is not None:
            query["hold.config"] = config
        with self._writing(provider_id):
            before: dict[str, Any] | None = await self._mongo.call(
                lambda db: db[PROVIDER_STATE].find_one_and_update(
                    query, {"$unset": {"hold": ""}}, return_document=ReturnDocument.BEFORE)
            )
        if before is None or not isinstance(before.get("hold"), dict):
            return None
        hold: dict[str, Any] = before["hold"]
        last = {**hold, "liftedAt": now, "liftedBecause": because}
        await self._mongo.call(
            lambda db: db[PROVIDER_STATE].update_one({"_id": provider_id},
                                                     {"$set": {"lastHold": last}})
        )
        return hold


def _ms(value: datetime) -> str:
    return _utc(value).isoformat(timespec="milliseconds")


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)
