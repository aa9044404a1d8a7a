"""Emails to tenant owners: the notifications that token refresh and health checks
record (`mwapjobs_notifications`) go to the tenant's owner, whose address comes from
the Auth0 Management API, instead of to the operators' channels.

- `mailer.py`: the delivery pass (digests, episodes, retries, the fallback to operators);
- `auth0.py`: the Management API client (token cache, 429, untrusted answers);
- `render.py` and `templates/`: the email, text and HTML;
- `api.py`: its HTTP route. Metrics: `mwapjobs_owner_emails_total{outcome}` and
  `mwapjobs_owner_notifications_pending`.

On only with everything it needs: `notifications.enabled`, `SMTP_HOST`, the Auth0 tenant
(`AUTH0_DOMAIN` or `notifications.auth0_url`) and a machine-to-machine client
(`AUTH0_CLIENT_ID`/`AUTH0_CLIENT_SECRET` or `notifications.client_id`/`client_secret`);
otherwise the operators get the notifications, as before, and the log says why once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

import aiohttp
from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily, Metric

from ...alerts.channels import SmtpClient, smtp_config
from ...config import Settings
from ...logs import secrets
from ...metrics import Source
from ...outbound import UrlPolicy
from ...storage.contacts import ContactStore
from ...storage.integrations import IntegrationStore
from ...storage.notifications import NotificationStore
from ..context import JobContext, JobPlugin
from .api import OPENAPI, OwnerEmailApi, routes
from .auth0 import Auth0Users
from .mailer import OwnerMailer

log = logging.getLogger(__name__)
OUTCOMES = ("emailed", "duplicate", "operators", "retry")


def missing(settings: Settings) -> list[str]:
    """What owner emails still need here (empty: they can run)."""
    s = settings.notifications
    out = []
    if not s.enabled:
        out.append("notifications.enabled is false")
    if not settings.smtp_host:
        out.append("SMTP_HOST is not set")
    if not (s.auth0_url or settings.auth0_domain):
        out.append("AUTH0_DOMAIN (or notifications.auth0_url) is not set")
    if not (s.client_id or settings.auth0_client_id):
        out.append("AUTH0_CLIENT_ID (or notifications.client_id) is not set")
    if not (s.client_secret or settings.auth0_client_secret):
        out.append("AUTH0_CLIENT_SECRET (or notifications.client_secret) is not set")
    return out


def register(ctx: JobContext) -> OwnerMailer | None:
    settings = ctx.settings
    s = settings.notifications
    notifications = NotificationStore(ctx.mongo)
    contacts = ContactStore(ctx.mongo)
    if s.client_secret is not None:  # nested: not among the settings' top-level secrets
        secrets.add(s.client_secret.get_secret_value())
    off = missing(settings)
    mailer = None
    if not off:
        counter = Counter("mwapjobs_owner_emails",
                          "Tenant notifications by where they went: emailed to the owner, "
                          "duplicate (an episode emailed before), operators (no address), "
                          "retry (a failed try).", ["outcome"], registry=ctx.metrics.registry)
        for outcome in OUTCOMES:
            counter.labels(outcome)
        mailer = build(settings, notifications, contacts, ctx.integrations, ctx.http,
                       ctx.policy, ctx.clock,
                       count=lambda outcome, n: counter.labels(outcome).inc(n))
        ctx.alerts.leave_owner_notifications("notifications")
        ctx.metrics.add_source(Source("owner_notifications", notifications.owner_summary_now,
                                      _families))
    elif s.enabled:
        log.info("owner emails are off; tenant notifications go to the operators' "
                    "channels", extra={"missing": off})
    ctx.add_routes(routes(OwnerEmailApi(mailer, off, notifications, contacts, s, ctx.clock)),
                   OPENAPI)
    if mailer is None:
        return None
    assert mailer is not None
    running = mailer

    async def start() -> None:
        await running.start()
        ctx.tasks.every("notifications:owners", s.check_interval, running.step,
                        first=0.0, max_backoff=300.0)

    ctx.when_ready("notifications:start", start)
    return mailer


def build(settings: Settings, notifications: NotificationStore, contacts: ContactStore,
          integrations: IntegrationStore, http: aiohttp.ClientSession, policy: UrlPolicy,
          clock: Callable[[], datetime],
          count: Callable[[str, int], None] = lambda _o, _n: None) -> OwnerMailer:
    """The mailer for `settings` (which `missing` found complete)."""
    s = settings.notifications
    secret = s.client_secret or settings.auth0_client_secret
    assert secret is not None
    domain = str(settings.auth0_domain or "").removeprefix("https://").strip("/")
    auth0 = Auth0Users(http, s.auth0_url or f"https://{domain}",
                       str(s.client_id or settings.auth0_client_id),
                       secret.get_secret_value(), policy, timeout=s.request_timeout)
    sender = s.email_from or settings.alerts.email_from
    config = smtp_config(settings, sender)
    assert config is not None
    return OwnerMailer(s, notifications, contacts, integrations, auth0, SmtpClient(config),
                       sender, clock, count=count)


def _families(pending: int | None) -> list[Metric]:
    family = GaugeMetricFamily("mwapjobs_owner_notifications_pending",
                               "Tenant notifications waiting for the owner mailer.")
    if pending is not None:
        family.add_metric([], float(pending))
    return [family]


PLUGIN = JobPlugin("notifications", register)
