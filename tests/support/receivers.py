"""Local peers for alert channels: a webhook receiver (aiohttp) and an SMTP server (aiosmtpd).

``WebhookReceiver`` runs on the test's own event loop::

    async with WebhookReceiver() as hook:       # 127.0.0.1:<random port>
        hook.fail(500, times=2)                  # the next two requests answer 500
        ...                                      # POST JSON to hook.url
        await hook.wait_for(1)                   # until one body was accepted
        hook.bodies                              # accepted JSON bodies, in order
        hook.requests                            # every request: (status, body)

``WebhookReceiver(port=p)`` listens on a given port, so a test can first point
a channel at a closed port (connection refused) and bring the receiver up later.

``SmtpReceiver`` is aiosmtpd's ``Controller`` in its own thread, plain SMTP
on 127.0.0.1 (no TLS)::

    with SmtpReceiver() as smtp:                # or SmtpReceiver(auth=("user", "pw"))
        ...                                      # send to smtp.host, smtp.port
        smtp.wait_for(1)
        smtp.messages[0].rcpt_tos, smtp.messages[0].email["Subject"]
        smtp.logins                              # [(user, password_ok)] when auth is on
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

from aiohttp import web
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from tests.support.local_server import LocalServer
from tests.support.ports import free_port
from tests.support.tls import LocalCert


class WebhookReceiver(LocalServer):
    """An HTTP endpoint that records JSON POSTs and can be told to fail."""

    def __init__(self, port: int = 0) -> None:
        super().__init__(port)
        self.bodies: list[Any] = []
        self.requests: list[tuple[int, Any]] = []
        self._faults: list[int] = []
        self._fail_always: int | None = None
        self._changed = asyncio.Event()

    @property
    def url(self) -> str:
        return f"{self.base_url}/hook"

    def fail(self, status: int = 500, times: int | None = None) -> None:
        """Answer `status` to the next `times` requests (all of them when None)."""
        if times is None:
            self._fail_always = status
        else:
            self._faults.extend([status] * times)

    def recover(self) -> None:
        self._fail_always = None
        self._faults.clear()

    async def _handle(self, request: web.Request) -> web.Response:
        try:
            body: Any = await request.json()
        except ValueError:
            body = await request.text()
        status = self._faults.pop(0) if self._faults else (self._fail_always or 200)
        self.requests.append((status, body))
        if status < 300:
            self.bodies.append(body)
        self._changed.set()
        return web.Response(status=status, text="ok" if status < 300 else "receiver failure")

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/hook", self._handle)

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Any]:
        """Wait until at least `count` bodies were accepted (2xx)."""
        async with asyncio.timeout(timeout):
            while len(self.bodies) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.bodies


@dataclass
class ReceivedMail:
    mail_from: str
    rcpt_tos: list[str]
    email: EmailMessage


@dataclass
class _Handler:
    messages: list[ReceivedMail] = field(default_factory=list)
    fail_next: int = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.fail_next:
            self.fail_next -= 1
            return "451 4.3.0 temporary failure (test)"
        raw = envelope.original_content or envelope.content or b""
        data = raw if isinstance(raw, bytes) else raw.encode()
        parsed = message_from_bytes(data, policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        self.messages.append(ReceivedMail(str(envelope.mail_from),
                                          list(envelope.rcpt_tos), parsed))
        return "250 OK"


class SmtpReceiver:
    """aiosmtpd on 127.0.0.1: plain SMTP, STARTTLS (`tls="starttls"`) or SMTPS
    (`tls="implicit"`) with a local certificate; optional AUTH (PLAIN/LOGIN), offered
    even without TLS, so that a client that logs in over plain text is seen in `logins`
    (which is what a man in the middle who strips STARTTLS would see)."""

    def __init__(self, auth: tuple[str, str] | None = None, *, tls: str | None = None,
                 cert: LocalCert | None = None) -> None:
        self.host = "127.0.0.1"
        self.port = free_port()
        self._handler = _Handler()
        self.logins: list[tuple[str, bool]] = []
        self._auth = auth
        kwargs: dict[str, Any] = {}
        if auth is not None:
            kwargs.update(authenticator=self._authenticate, auth_require_tls=False)
        if tls == "starttls":
            assert cert is not None
            kwargs.update(tls_context=cert.server_context())
        elif tls == "implicit":
            assert cert is not None
            kwargs.update(ssl_context=cert.server_context())
        self._controller = Controller(self._handler, hostname=self.host, port=self.port,
                                      **kwargs)
        self._lock = threading.Lock()

    @property
    def messages(self) -> list[ReceivedMail]:
        return self._handler.messages

    def fail_next(self, times: int = 1) -> None:
        self._handler.fail_next = times

    def _authenticate(self, server: SMTP, session: Session, envelope: Envelope,
                      mechanism: str, auth_data: Any) -> AuthResult:
        assert self._auth is not None
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        user = auth_data.login.decode()
        ok = (user, auth_data.password.decode()) == self._auth
        with self._lock:
            self.logins.append((user, ok))
        return AuthResult(success=ok, handled=False)

    def start(self) -> SmtpReceiver:
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[ReceivedMail]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {count} emails")
            time.sleep(0.02)
        return self.messages

    async def wait_for_async(self, count: int, timeout: float = 10.0) -> list[ReceivedMail]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {count} emails")
            await asyncio.sleep(0.02)
        return self.messages

    def __enter__(self) -> SmtpReceiver:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
