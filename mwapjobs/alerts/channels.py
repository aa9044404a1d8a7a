"""Where alerts and notifications go: the log, Slack-compatible webhooks, and email.

A channel's `send` either delivers or raises; retrying is the caller's job
(`notifier.Dispatcher` for alerts, the durable notification pass for tenant
notifications). Every send runs under a timeout set by the caller, and no
channel is ever awaited on a job's path.
"""

from __future__ import annotations

import asyncio
import logging
import smtplib
import ssl
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any, ClassVar, Literal, Protocol

import aiohttp

from ..config import Settings
from ..logs import secrets

log = logging.getLogger("mwapjobs.alerts")

Kind = Literal["firing", "resolved", "notification"]
PREFIX = "[mwapjobs]"


@dataclass(frozen=True)
class Message:
    """One thing to tell operators. `text` is what every channel shows; its first
    line is the email subject. `event` is the structured form for generic webhooks."""

    kind: Kind
    text: str
    event: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def subject(self) -> str:
        return self.text.splitlines()[0][:200] if self.text else PREFIX


def firing(rule: str, details: str, runbook: str | None = None, **event: Any) -> Message:
    """The first line says what is wrong (an email's subject); the second, where the
    runbook says what to do about it."""
    text = secrets.scrub(f"{PREFIX} FIRING: {rule}: {details}"
                         + (f"\nRunbook: {runbook}" if runbook else ""))
    return Message("firing", text, {"status": "firing", "rule": rule, "details": details,
                                    "runbook": runbook, **event})


def resolved(rule: str, **event: Any) -> Message:
    text = secrets.scrub(f"{PREFIX} RESOLVED: {rule}")
    return Message("resolved", text, {"status": "resolved", "rule": rule, **event})


def notification(doc: dict[str, Any]) -> Message:
    """A tenant-owner notification from `mwapjobs_notifications`, for operators' channels."""
    kind = str(doc.get("kind") or "notification")
    reason = str(doc.get("reason") or "")
    text = secrets.scrub(
        f"{PREFIX} NOTIFICATION: {kind}: tenant {doc.get('tenantId')}, "
        f"integration {doc.get('integrationId')} (provider {doc.get('providerId')})"
        + (f": {reason}" if reason else "")
    )
    event = {"status": "notification", "kind": kind, "tenantId": doc.get("tenantId"),
             "integrationId": doc.get("integrationId"), "providerId": doc.get("providerId"),
             "reason": secrets.scrub(reason), "notificationId": str(doc.get("_id"))}
    created = doc.get("createdAt")
    if isinstance(created, datetime):
        event["createdAt"] = created.isoformat()
    return Message("notification", text, event, id=str(doc.get("_id") or uuid.uuid4().hex))


class ChannelError(Exception):
    """A delivery failed; the message says why, without secrets."""


class Channel(Protocol):
    name: str

    async def send(self, message: Message) -> None: ...

    async def close(self) -> None: ...


class LogChannel:
    """An error-level JSON line per firing, info on resolve, warning per notification."""

    name = "log"
    _levels: ClassVar[dict[str, int]] = {"firing": logging.ERROR, "resolved": logging.INFO,
               "notification": logging.WARNING}

    async def send(self, message: Message) -> None:
        log.log(self._levels[message.kind], message.text,
                extra={"alert": {k: v for k, v in message.event.items() if v is not None}})

    async def close(self) -> None:
        return None


class WebhookChannel:
    """POST `{"text": ...}` (Slack's incoming-webhook format); anything but 2xx fails.

    With `structured=True` (ALERT_WEBHOOK_URL) the body also carries `event`, the
    alert as fields; a Slack-compatible receiver reads `text` and ignores it.
    """

    def __init__(self, name: str, url: str, *, structured: bool = False,
                 user_agent: str = "mwapjobs-alerts") -> None:
        self.name = name
        self._url = url
        self._structured = structured
        self._user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None

    async def send(self, message: Message) -> None:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers={"User-Agent": self._user_agent})
        body: dict[str, Any] = {"text": message.text}
        if self._structured:
            body["event"] = {**message.event, "id": message.id,
                             "at": message.created_at.isoformat()}
        try:
            async with self._session.post(self._url, json=body) as response:
                if not 200 <= response.status < 300:
                    detail = (await response.text())[:200]
                    raise ChannelError(f"HTTP {response.status}: {detail}")
        except aiohttp.ClientError as exc:
            # The exception text can repeat the URL (a Slack URL is a secret).
            raise ChannelError(secrets.scrub(f"{type(exc).__name__}: {exc}")) from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


@dataclass(frozen=True)
class SmtpConfig:
    host: str
    port: int
    secure: bool  # True: SMTPS (TLS from the first byte); False: STARTTLS when offered
    user: str | None
    password: str | None
    sender: str
    recipients: tuple[str, ...]
    timeout: float = 30.0
    allow_plaintext: bool = False  # log in without TLS (a relay on localhost only)
    ca_file: str | None = None  # trust these CAs instead of the system's (a private relay)


class SmtpClient:
    """Sends an email over SMTP with the standard library, in a worker thread: the one
    SMTP client of mwapjobs (operator alerts and tenant-owner emails both use it).

    TLS: `SMTP_SECURE=true` is TLS from the first byte (SMTPS); otherwise STARTTLS
    whenever the server offers it. With credentials set, TLS is required: a server that
    offers no STARTTLS (or a man in the middle who strips it) gets no password, and the
    delivery fails with that reason, unless `alerts.smtp_allow_plaintext` says otherwise.
    Certificates are verified against the system's trust store (or `ca_file`).
    """

    def __init__(self, config: SmtpConfig) -> None:
        self.config = config

    async def send(self, email: EmailMessage, recipients: Sequence[str]) -> None:
        """Deliver `email` to `recipients`; ChannelError (secrets scrubbed) if it fails."""
        try:
            await asyncio.to_thread(self._deliver, email, list(recipients))
        except (OSError, smtplib.SMTPException) as exc:
            raise ChannelError(secrets.scrub(f"{type(exc).__name__}: {exc}")) from None

    def _deliver(self, email: EmailMessage, recipients: list[str]) -> None:
        c = self.config
        smtp: smtplib.SMTP
        if c.secure:
            smtp = smtplib.SMTP_SSL(c.host, c.port, timeout=c.timeout,
                                    context=ssl.create_default_context(cafile=c.ca_file))
        else:
            smtp = smtplib.SMTP(c.host, c.port, timeout=c.timeout)
        with smtp:
            smtp.ehlo()
            encrypted = c.secure
            if not c.secure and smtp.has_extn("starttls"):
                smtp.starttls(context=ssl.create_default_context(cafile=c.ca_file))
                smtp.ehlo()
                encrypted = True
            if c.user and c.password:
                if not encrypted and not c.allow_plaintext:
                    # A man in the middle who strips STARTTLS must not get SMTP_PASS.
                    raise ChannelError(
                        "the SMTP server offers no TLS (STARTTLS): refusing to send the "
                        "password in clear; use SMTP_SECURE=true, a server with STARTTLS, "
                        "or alerts.smtp_allow_plaintext = true for a local relay")
                smtp.login(c.user, c.password)
            smtp.send_message(email, from_addr=c.sender, to_addrs=recipients)


class EmailChannel:
    """Plain-text alert emails to ALERT_EMAIL_RECIPIENTS, through `SmtpClient`."""

    name = "email"

    def __init__(self, config: SmtpConfig) -> None:
        self.config = config
        self.client = SmtpClient(config)

    async def send(self, message: Message) -> None:
        email = EmailMessage()
        email["From"] = self.config.sender
        email["To"] = ", ".join(self.config.recipients)
        email["Subject"] = message.subject
        email["Date"] = formatdate(localtime=False)
        email["Message-ID"] = make_msgid(domain="mwapjobs")
        email.set_content(message.text + "\n")
        await self.client.send(email, self.config.recipients)

    async def close(self) -> None:
        return None


def smtp_config(settings: Settings, sender: str, recipients: tuple[str, ...] = (),
                timeout: float = 30.0) -> SmtpConfig | None:
    """The SMTP server MWAP's variables configure (None without SMTP_HOST)."""
    if not settings.smtp_host:
        return None
    password = settings.smtp_pass.get_secret_value() if settings.smtp_pass else None
    return SmtpConfig(
        host=settings.smtp_host, port=settings.smtp_port, secure=settings.smtp_secure,
        user=settings.smtp_user or None, password=password or None, sender=sender,
        recipients=recipients, timeout=timeout,
        allow_plaintext=settings.alerts.smtp_allow_plaintext,
        ca_file=settings.alerts.smtp_ca_file)


def parse_recipients(value: str | None) -> tuple[str, ...]:
    """ALERT_EMAIL_RECIPIENTS: comma-separated (semicolons and spaces tolerated)."""
    if not value:
        return ()
    parts = value.replace(";", ",").split(",")
    return tuple(dict.fromkeys(p.strip() for p in parts if p.strip()))


def channels_from_settings(settings: Settings, timeout: float = 30.0) -> list[Channel]:
    """The operator channels MWAP's variables configure; the log is always one."""
    channels: list[Channel] = [LogChannel()]
    if settings.slack_webhook_url is not None and settings.slack_webhook_url.get_secret_value():
        channels.append(WebhookChannel("slack", settings.slack_webhook_url.get_secret_value()))
    if settings.alert_webhook_url is not None and settings.alert_webhook_url.get_secret_value():
        channels.append(WebhookChannel("webhook", settings.alert_webhook_url.get_secret_value(),
                                       structured=True))
    recipients = parse_recipients(settings.alert_email_recipients)
    config = smtp_config(settings, settings.alerts.email_from, recipients, timeout)
    if config is not None and recipients:
        channels.append(EmailChannel(config))
    elif settings.smtp_host or recipients:
        missing = "ALERT_EMAIL_RECIPIENTS" if settings.smtp_host else "SMTP_HOST"
        log.warning("email alerts are off: %s is not set", missing)
    return channels
