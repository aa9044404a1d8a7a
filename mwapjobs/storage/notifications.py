"""Tenant-owner notifications, in `mwapjobs_notifications`: recorded by the jobs that
find something a tenant must know (an integration expired or revoked), delivered by
alerting (`alerts.notifier`).

A notification is `{kind, tenantId, integrationId, providerId, reason, createdAt,
delivered: false}`. A delivery pass claims one due, undelivered notification at a time
by pushing its `nextAttemptAt` forward (so two daemons never deliver the same one at
once), records which channels took it (`deliveredTo`), and finally `delivered: true`.
A channel failure leaves it undelivered with `attempts`, `lastError` and a later
`nextAttemptAt`, so it is retried, also after a restart.

Each notification carries its `episode`: a hash of its kind, the integration and the
tokens it was about (refresh token and `tokenExpiresAt`), so that the same integration
expiring once is one episode however often it is recorded, and a reconnect (or a
refresh that worked) starts another.

When tenant owners are emailed (jobs/notifications/), a notification is first the
mailer's: it sets `route` to `owner` once the owner was emailed (`ownerEmail` says when,
to whom, masked) or to `operators` when there is no address to use (`routeReason`), and
the operators' delivery then takes only the `operators` ones (`claim(routed_only=True)`).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

from pymongo import ASCENDING, DESCENDING, ReturnDocument

from .mongo import Mongo
from .names import NOTIFICATIONS

OWNER, OPERATORS = "owner", "operators"  # where a notification was routed
OWNER_CHANNEL = "owner-email"  # its name in `deliveredTo`


def episode_of(kind: str, integration: dict[str, Any]) -> str:
    """One episode per kind, integration and tokens (see the module's docstring)."""
    expires = integration.get("tokenExpiresAt")
    stamp = expires.isoformat(timespec="milliseconds") if isinstance(expires, datetime) else ""
    text = f"{kind}|{integration.get('_id')}|{integration.get('refreshToken') or ''}|{stamp}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _owner_done(ids: list[Any], now: datetime,
                extra: dict[str, Any]) -> Callable[[Any], Awaitable[Any]]:
    return lambda db: db[NOTIFICATIONS].update_many(
        {"_id": {"$in": ids}, "delivered": False},
        {"$set": {"delivered": True, "deliveredAt": now, "route": OWNER, **extra},
         "$addToSet": {"deliveredTo": OWNER_CHANNEL},
         "$unset": {"nextAttemptAt": "", "lastError": "", "claim": ""}})


def _due(now: datetime) -> list[dict[str, Any]]:
    return [{"nextAttemptAt": None}, {"nextAttemptAt": {"$lte": now}}]


class NotificationStore:
    def __init__(self, mongo: Mongo) -> None:
        self._mongo = mongo

    async def ensure_indexes(self) -> None:
        await self._mongo.call(lambda db: db[NOTIFICATIONS].create_index(
            [("createdAt", DESCENDING)], name="mwapjobs_notifications_recent"))
        await self._mongo.call(lambda db: db[NOTIFICATIONS].create_index(
            [("delivered", ASCENDING), ("createdAt", ASCENDING)],
            name="mwapjobs_notifications_pending"))
        await self._mongo.call(lambda db: db[NOTIFICATIONS].create_index(
            [("episode", ASCENDING)], name="mwapjobs_notifications_episode", sparse=True))

    async def record(self, kind: str, integration: dict[str, Any], reason: str,
                     now: datetime) -> None:
        """Record a notification about `integration` durably; delivery comes later."""
        doc = {"kind": kind, "tenantId": integration.get("tenantId"),
               "integrationId": str(integration["_id"]),
               "providerId": integration.get("providerId"), "reason": reason,
               "episode": episode_of(kind, integration), "createdAt": now,
               "delivered": False}
        await self._mongo.call(lambda db: db[NOTIFICATIONS].insert_one(doc))

    async def claim(self, now: datetime, hold_until: datetime, *,
                    routed_only: bool = False) -> dict[str, Any] | None:
        """Take the oldest undelivered notification that is due, holding it until
        `hold_until` (after which another pass, or another daemon, may take it);
        `routed_only`: only those the owner mailer handed to the operators."""
        query: dict[str, Any] = {"delivered": False, "$or": _due(now)}
        if routed_only:
            query["route"] = OPERATORS
        doc: dict[str, Any] | None = await self._mongo.call(
            lambda db: db[NOTIFICATIONS].find_one_and_update(
                query, {"$set": {"nextAttemptAt": hold_until}},
                sort=[("createdAt", ASCENDING)], return_document=ReturnDocument.AFTER,
            )
        )
        return doc

    async def record_delivery(self, doc_id: Any, delivered_to: list[str], done: bool,
                              now: datetime, error: str | None,
                              retry_at: datetime | None) -> None:
        """Write the outcome of one delivery attempt."""
        update: dict[str, Any] = {"$addToSet": {"deliveredTo": {"$each": delivered_to}}}
        if done:
            update["$set"] = {"delivered": True, "deliveredAt": now}
            update["$unset"] = {"nextAttemptAt": "", "lastError": ""}
        else:
            update["$set"] = {"nextAttemptAt": retry_at, "lastError": error,
                              "lastAttemptAt": now}
            update["$inc"] = {"attempts": 1}
        if not delivered_to:
            del update["$addToSet"]
        await self._mongo.call(
            lambda db: db[NOTIFICATIONS].update_one({"_id": doc_id, "delivered": False}, update)
        )

    # -- the owner mailer (jobs/notifications/) ------------------------------------------

    async def claim_owner_group(self, now: datetime, created_before: datetime,
                                hold_until: datetime) -> list[dict[str, Any]]:
        """The due notifications not routed yet of one tenant, the one whose oldest has
        waited since `created_before` (a digest window), held until `hold_until`. Two
        round trips to find and hold them, one to read them back; empty when none is due."""
        first: dict[str, Any] | None = await self._mongo.call(
            lambda db: db[NOTIFICATIONS].find_one(
                {"delivered": False, "route": None, "createdAt": {"$lte": created_before},
                 "$or": _due(now)}, {"tenantId": 1}, sort=[("createdAt", ASCENDING)]))
        if first is None:
            return []
        token = uuid.uuid4().hex
        await self._mongo.call(lambda db: db[NOTIFICATIONS].update_many(
            {"delivered": False, "route": None, "tenantId": first.get("tenantId"),
             "$or": _due(now)},
            {"$set": {"nextAttemptAt": hold_until, "claim": token}}))
        docs: list[dict[str, Any]] = await self._mongo.call(
            lambda db: db[NOTIFICATIONS].find({"claim": token, "delivered": False})
            .sort("createdAt", ASCENDING).to_list(None))
        return docs

    async def emailed_episodes(self, episodes: Sequence[str]) -> set[str]:
        """Which of these episodes an owner was emailed about already."""
        if not episodes:
            return set()
        values = await self._mongo.call(lambda db: db[NOTIFICATIONS].distinct(
            "episode", {"episode": {"$in": list(episodes)}, "route": OWNER}))
        return {str(v) for v in values}

    async def mark_emailed(self, ids: Sequence[Any], now: datetime, to: str, digest: int,
                           duplicates: Sequence[Any] = ()) -> None:
        """The owner got the email for `ids` (`to`: the masked address); `duplicates` were
        about an episode emailed before, and are done without another email."""
        for group, extra in ((ids, {"ownerEmail": {"sentAt": now, "to": to,
                                                   "digest": digest}}),
                             (duplicates, {"ownerEmail": {"duplicate": True, "to": to}})):
            if group:
                await self._mongo.call(_owner_done(list(group), now, extra))

    async def route_to_operators(self, ids: Sequence[Any], reason: str) -> None:
        """No owner address to use: the operators' channels take these, as before."""
        await self._mongo.call(lambda db: db[NOTIFICATIONS].update_many(
            {"_id": {"$in": list(ids)}, "delivered": False},
            {"$set": {"route": OPERATORS, "routeReason": reason},
             "$unset": {"nextAttemptAt": "", "claim": ""}}))

    async def retry_owner_later(self, ids: Sequence[Any], now: datetime, retry_at: datetime,
                                error: str, *, count: bool = True) -> None:
        """The email (or the address look-up) failed for now; `count=False` for a wait
        the far side asked for (a rate limit), which is no failed attempt."""
        update: dict[str, Any] = {"$set": {"nextAttemptAt": retry_at, "lastError": error,
                                           "lastAttemptAt": now}, "$unset": {"claim": ""}}
        if count:
            update["$inc"] = {"attempts": 1}
        await self._mongo.call(lambda db: db[NOTIFICATIONS].update_many(
            {"_id": {"$in": list(ids)}, "delivered": False}, update))

    async def owner_summary(self, since: datetime) -> dict[str, int]:
        """Counts for the operators' view: waiting for the mailer, waiting after a failed
        try, emailed and handed to operators since `since`."""
        async def count(query: dict[str, Any]) -> int:
            return int(await self._mongo.call(
                lambda db: db[NOTIFICATIONS].count_documents(query)))

        return {
            "pending": await count({"delivered": False, "route": None}),
            "retrying": await count({"delivered": False, "route": None,
                                     "attempts": {"$gte": 1}}),
            "emailed": await count({"route": OWNER, "ownerEmail.sentAt": {"$gte": since}}),
            "toOperators": await count({"route": OPERATORS, "createdAt": {"$gte": since}}),
        }

    async def owner_summary_now(self) -> int:
        """Notifications waiting for the owner mailer (for /metrics)."""
        n = await self._mongo.call(lambda db: db[NOTIFICATIONS].count_documents(
            {"delivered": False, "route": None}))
        return int(n)

    async def recent_owner_emails(self, limit: int = 20) -> list[dict[str, Any]]:
        docs: list[dict[str, Any]] = await self._mongo.call(
            lambda db: db[NOTIFICATIONS].find(
                {"route": {"$in": [OWNER, OPERATORS]}},
                {"kind": 1, "tenantId": 1, "createdAt": 1, "route": 1, "routeReason": 1,
                 "ownerEmail": 1, "delivered": 1})
            .sort("createdAt", DESCENDING).limit(limit).to_list(limit))
        return docs
