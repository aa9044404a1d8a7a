"""`GET /api/v1/notifications/owner-emails` (admin token or superadmin): whether owner
emails are on here (and if not, why), the counts of the last week, the Auth0 client's
state, and the latest notifications with where they went (addresses masked)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from aiohttp import web

from ...api.envelope import ok
from ...api.keys import AUTH
from ...api.openapi import operation
from ...config import OwnerEmailSettings
from ...storage.contacts import ContactStore
from ...storage.notifications import NotificationStore
from .mailer import OwnerMailer

PATH = "/api/v1/notifications/owner-emails"
OPENAPI = {PATH: {"get": operation(
    "Emails to tenant owners: on or off (and why), counts, recent notifications",
    errors=("503",))}}
WEEK = timedelta(days=7)


@dataclass(frozen=True)
class OwnerEmailApi:
    mailer: OwnerMailer | None
    off_because: list[str]
    notifications: NotificationStore
    contacts: ContactStore
    settings: OwnerEmailSettings
    clock: Callable[[], datetime]


OWNER_EMAIL_API: web.AppKey[OwnerEmailApi] = web.AppKey("owner_email_api")


def _recent(doc: dict[str, Any]) -> dict[str, Any]:
    found = doc.get("ownerEmail")
    sent: dict[str, Any] = found if isinstance(found, dict) else {}
    return {"kind": doc.get("kind"), "tenantId": doc.get("tenantId"),
            "createdAt": doc.get("createdAt"), "route": doc.get("route"),
            "delivered": bool(doc.get("delivered")), "routeReason": doc.get("routeReason"),
            "sentAt": sent.get("sentAt"), "to": sent.get("to"),
            "digest": sent.get("digest"), "duplicate": bool(sent.get("duplicate"))}


async def summary(request: web.Request) -> web.Response:
    await request.app[AUTH].require_admin(request)
    api = request.app[OWNER_EMAIL_API]
    now = api.clock()
    mailer = api.mailer
    return ok({
        "enabled": mailer is not None,
        "offBecause": api.off_because,
        "digestWindow": api.settings.digest_window,
        "lastWeek": await api.notifications.owner_summary(now - WEEK),
        "contacts": await api.contacts.counts(now),
        "auth0": None if mailer is None else {
            "lastError": mailer.auth0.last_error, "tokenFetches": mailer.auth0.token_fetches,
            "rateLimitedUntil": mailer.rate_limited_until},
        "lastPass": None if mailer is None else mailer.last_pass,
        "recent": [_recent(d) for d in await api.notifications.recent_owner_emails()],
    })


def routes(api: OwnerEmailApi) -> Callable[[web.Application], None]:
    def add(app: web.Application) -> None:
        app[OWNER_EMAIL_API] = api
        app.router.add_get(PATH, summary)
    return add
