"""Tenant-owner notifications, emailed to the owner (see README, "Emails to tenant owners").

Every `notifications.check_interval` seconds a pass takes, tenant by tenant, the
notifications nobody routed yet whose oldest has waited `digest_window` seconds (so
that what happens together arrives together: one email, a digest when there are
several), holding them so that two daemons never send them both:

1. the tenant (`tenants`, for its name and `ownerId`), then the owner's address: from
   `mwapjobs_owner_contacts` while it is fresh, else from Auth0 (auth0.py), remembered
   for `address_ttl` seconds (`unusable_ttl` when there is none to use);
2. notifications about an episode the owner was emailed about already (the same
   integration expiring again and again before a reconnect) are done without an email;
3. the email (render.py) goes out through the SMTP client of alerting (its TLS rules);
   the notifications are then `delivered`, `route: owner`, with `ownerEmail` (when, to
   whom, masked, how many in the digest).

When there is no address to use (no tenant, an unknown user, an unverified or missing
email) the notifications are routed to the operators' channels as before (`route:
operators`), and alerting delivers them. A failure that may pass (SMTP, Auth0 5xx or
network) is retried after `check_interval` × 2^(attempts−1), at most hourly, durably;
Auth0's rate limit waits as long as Auth0 says, without counting as an attempt; after
`lookup_attempts` failed look-ups the notifications go to the operators. Addresses are
never logged in full.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from string import Template
from typing import Any

from ...alerts.channels import ChannelError, SmtpClient
from ...config import OwnerEmailSettings
from ...logs import secrets
from ...storage.contacts import ContactStore
from ...storage.integrations import IntegrationStore
from ...storage.notifications import NotificationStore
from ...timeouts import within
from .auth0 import Auth0Users, Found, Lookup, NotFound, RateLimited, Unavailable, mask_email
from .render import Item, load_templates, render

log = logging.getLogger(__name__)

RETRY_MAX = 3600.0
SEND_GRACE = 5.0  # seconds an email on its way at shutdown may take to be sent and recorded
HOLD_SECONDS = 120.0  # how long a pass holds what it took (an SMTP send has 30 s)


@dataclass
class PassReport:
    emailed: int = 0  # emails sent
    notifications: int = 0  # notifications they covered
    duplicates: int = 0
    to_operators: int = 0
    retrying: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)


class OwnerMailer:
    def __init__(self, settings: OwnerEmailSettings, notifications: NotificationStore,
                 contacts: ContactStore, integrations: IntegrationStore, auth0: Auth0Users,
                 smtp: SmtpClient, sender: str, clock: Callable[[], datetime],
                 count: Callable[[str, int], None] = lambda _outcome, _n: None) -> None:
        self.settings = settings
        self.notifications = notifications
        self.contacts = contacts
        self.integrations = integrations
        self.auth0 = auth0
        self.smtp = smtp
        self.sender = sender
        self.clock = clock
        self.count = count  # metrics: outcome, notifications
        self.templates: dict[str, Template] | None = None
        self.last_pass: dict[str, Any] | None = None
        self.rate_limited_until: datetime | None = None

    async def start(self) -> None:
        """Read the templates (files: in a thread) and make our indexes."""
        templates, problems = await asyncio.to_thread(load_templates,
                                                      self.settings.templates_dir)
        for problem in problems:
            log.error("owner email template not used (ours instead)", extra={"error": problem})
        self.templates = templates
        await self.contacts.ensure_indexes()
        await self.notifications.ensure_indexes()

    async def step(self) -> PassReport:
        """One pass (see the module's docstring)."""
        report = PassReport()
        if self.templates is None:
            await self.start()
        now = self.clock()
        if self.rate_limited_until is not None and now < self.rate_limited_until:
            return report
        providers = await self.integrations.providers_by_id()
        window = now - timedelta(seconds=self.settings.digest_window)
        hold = now + timedelta(seconds=HOLD_SECONDS)
        for _ in range(self.settings.batch):
            claim = asyncio.ensure_future(
                self.notifications.claim_owner_group(now, window, hold))
            try:
                group = await asyncio.shield(claim)
            except asyncio.CancelledError:  # what the claim took must not wait out the hold
                with contextlib.suppress(Exception):
                    await self._release(await within(claim, SEND_GRACE), now)
                raise
            if not group:
                break
            try:
                delivered = await self._deliver(group, providers, now, report)
            except asyncio.CancelledError:  # the daemon stops: hand the group back now
                await self._release(group, now)
                raise
            if not delivered:
                break  # rate limited: the rest waits too
        self.last_pass = {"at": now, "emailed": report.emailed,
                          "notifications": report.notifications,
                          "duplicates": report.duplicates, "toOperators": report.to_operators,
                          "retrying": report.retrying}
        return report

    async def _deliver(self, group: list[dict[str, Any]], providers: dict[str, dict[str, Any]],
                       now: datetime, report: PassReport) -> bool:
        ids = [d["_id"] for d in group]
        tenant_id = str(group[0].get("tenantId"))
        tenant = await self.contacts.tenant(tenant_id)
        owner = tenant.get("ownerId") if tenant else None
        if not isinstance(owner, str) or not owner:
            await self._to_operators(ids, "the tenant or its owner is gone", tenant_id, report)
            return True
        contact = await self._contact(owner, now)
        if isinstance(contact, RateLimited):
            self.rate_limited_until = now + timedelta(seconds=contact.retry_after)
            await self.notifications.retry_owner_later(
                ids, now, self.rate_limited_until, "Auth0 rate limit", count=False)
            log.warning("Auth0 rate limit: owner emails wait",
                        extra={"retryIn": contact.retry_after})
            report.retrying += len(ids)
            return False
        if isinstance(contact, Unavailable):
            attempts = max(int(d.get("attempts") or 0) for d in group) + 1
            if attempts >= self.settings.lookup_attempts:
                await self._to_operators(ids, f"no address after {attempts} tries: "
                                              f"{contact.reason}", tenant_id, report)
            else:
                await self._later(group, now, f"address look-up: {contact.reason}", report)
            return True
        if not isinstance(contact, Found):
            await self._to_operators(ids, contact.reason, tenant_id, report)
            return True
        episodes = [str(d["episode"]) for d in group if d.get("episode")]
        emailed = await self.notifications.emailed_episodes(episodes)
        todo, duplicates, seen = [], [], set()
        for doc in group:
            episode = doc.get("episode")
            if episode and (episode in emailed or episode in seen):
                duplicates.append(doc["_id"])
            else:
                todo.append(doc)
                if episode:
                    seen.add(episode)
        to = mask_email(contact.email)
        if not todo:
            await self.notifications.mark_emailed([], now, to, 0, duplicates)
            report.duplicates += len(duplicates)
            self.count("duplicate", len(duplicates))
            return True
        message = self._message(contact, tenant or {}, tenant_id, todo, providers)
        done = self.notifications.mark_emailed([d["_id"] for d in todo], now, to, len(todo),
                                               duplicates)
        sending = asyncio.ensure_future(self.smtp.send(message, [contact.email]))
        try:
            await asyncio.shield(sending)
        except asyncio.CancelledError:
            # The daemon stops while the email is on its way (a thread cannot be
            # cancelled): let it end, briefly, and record it, so that it is not sent twice.
            with contextlib.suppress(Exception):
                await within(asyncio.shield(sending), SEND_GRACE)
            if sending.done() and not sending.cancelled() and sending.exception() is None:
                with contextlib.suppress(Exception):
                    await within(done, SEND_GRACE)
            else:
                done.close()
            raise
        except ChannelError as exc:
            done.close()
            error = secrets.scrub(str(exc)).replace(contact.email, to)
            await self._later(todo, now, f"email: {error}", report)
            return True
        await done
        report.emailed += 1
        report.notifications += len(todo)
        report.duplicates += len(duplicates)
        self.count("emailed", len(todo))
        if duplicates:
            self.count("duplicate", len(duplicates))
        log.info("tenant owner emailed", extra={
            "tenantId": tenant_id, "to": to, "notifications": len(todo),
            "kinds": sorted({str(d.get("kind")) for d in todo})})
        return True

    async def _release(self, group: list[dict[str, Any]], now: datetime) -> None:
        """Make what this pass held due again (else it would wait out the hold)."""
        release = self.notifications.retry_owner_later(
            [d["_id"] for d in group], now, now, "interrupted by a shutdown", count=False)
        with contextlib.suppress(Exception):
            await within(asyncio.shield(release), 2.0)

    async def _contact(self, owner: str, now: datetime) -> Lookup:
        cached = await self.contacts.get(owner, now)
        if cached is not None:
            if cached.get("found") and isinstance(cached.get("email"), str):
                return Found(cached["email"], cached.get("name"))
            return NotFound(str(cached.get("reason") or "no address to use"))
        looked = await self.auth0.user(owner)
        if isinstance(looked, Found):
            await self.contacts.found(owner, looked.email, looked.name, now,
                                      now + timedelta(seconds=self.settings.address_ttl))
        elif isinstance(looked, RateLimited | Unavailable):
            return looked
        else:
            await self.contacts.unusable(owner, looked.reason, now,
                                         now + timedelta(seconds=self.settings.unusable_ttl))
        return looked

    def _message(self, contact: Found, tenant: dict[str, Any], tenant_id: str,
                 docs: list[dict[str, Any]],
                 providers: dict[str, dict[str, Any]]) -> EmailMessage:
        assert self.templates is not None
        items = []
        for doc in docs:
            provider_id = str(doc.get("providerId") or "")
            provider = providers.get(provider_id) or {}
            name = provider.get("name") or provider.get("slug")
            items.append(Item(kind=str(doc.get("kind")),
                              provider=str(name) if name else "your cloud storage",
                              provider_slug=str(provider.get("slug") or ""),
                              provider_id=provider_id,
                              integration_id=str(doc.get("integrationId") or "")))
        name = tenant.get("name")
        email = render(self.templates, owner_name=contact.name,
                       tenant_name=str(name) if name else "your MWAP workspace",
                       tenant_id=tenant_id, items=items,
                       reconnect_url=self.settings.reconnect_url)
        message = EmailMessage()
        message["From"] = self.sender
        message["To"] = contact.email
        message["Subject"] = email.subject
        message["Date"] = formatdate(localtime=False)
        message["Message-ID"] = make_msgid(domain="mwapjobs")
        message.set_content(email.text)
        message.add_alternative(email.html, subtype="html")
        return message

    async def _later(self, docs: list[dict[str, Any]], now: datetime, error: str,
                     report: PassReport) -> None:
        attempts = max(int(d.get("attempts") or 0) for d in docs)
        delay = min(self.settings.check_interval * 2 ** attempts, RETRY_MAX)
        await self.notifications.retry_owner_later([d["_id"] for d in docs], now,
                                                   now + timedelta(seconds=delay), error[:300])
        report.retrying += len(docs)
        self.count("retry", len(docs))
        log.warning("owner email failed; will retry", extra={
            "tenantId": docs[0].get("tenantId"), "notifications": len(docs),
            "error": error[:300], "retryIn": delay})

    async def _to_operators(self, ids: list[Any], reason: str, tenant_id: str,
                            report: PassReport) -> None:
        await self.notifications.route_to_operators(ids, reason[:300])
        report.to_operators += len(ids)
        self.count("operators", len(ids))
        log.info("no owner address to use: notifications go to the operators",
                 extra={"tenantId": tenant_id, "reason": reason[:300],
                        "notifications": len(ids)})
