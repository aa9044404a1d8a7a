"""Emails to tenant owners (jobs/notifications/) against a local Auth0 (tests/support/
fake_auth0.py) and a real SMTP server (aiosmtpd): one email per episode, digests, the
rendered parts, Auth0's 429 and unknown users, retries that survive a restart, and the
fallback to the operators' channels."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mwapjobs.config import Settings
from mwapjobs.daemon import Daemon
from mwapjobs.jobs.notifications import build, missing
from mwapjobs.jobs.notifications.mailer import OwnerMailer
from mwapjobs.outbound import UrlPolicy
from mwapjobs.storage.contacts import ContactStore
from mwapjobs.storage.integrations import IntegrationStore
from mwapjobs.storage.mongo import Mongo
from mwapjobs.storage.notifications import NotificationStore
from tests.conftest import make_settings, wait_for
from tests.support.admin import call, with_admin
from tests.support.fake_auth0 import FakeAuth0
from tests.support.mwap_data import (
    get_integration,
    insert_integration,
    insert_provider,
    insert_tenant,
    notifications,
    test_cipher,
    update_integration,
)
from tests.support.receivers import SmtpReceiver
from tests.support.tls import self_signed

SECRET = "m2m-client-s3cret-do-not-leak"
ALICE = "alice.owner@example.com"
LINK = "https://app.example.com/tenants/{tenantId}/reconnect?provider={providerSlug}"


@pytest.fixture
async def auth0() -> AsyncIterator[FakeAuth0]:
    async with FakeAuth0(client_id="m2m", client_secret=SECRET) as server:
        server.users["auth0|alice"] = {"email": ALICE, "email_verified": True,
                                       "name": "Alice Owner"}
        server.users["auth0|unverified"] = {"email": "u@example.com", "email_verified": False}
        yield server


@pytest.fixture
def smtp() -> Iterator[SmtpReceiver]:
    with SmtpReceiver() as server:
        yield server


def owner_settings(auth0: FakeAuth0, smtp: SmtpReceiver, top: dict[str, Any] | None = None,
                   **notifications: Any) -> Settings:
    top = dict(top or {})
    alerts = {"check_interval": 0.2, "email_from": "mwapjobs@example.com",
              **top.pop("alerts", {})}
    return make_settings(**with_admin(
        refresh={"enabled": False}, health={"enabled": False},
        smtp_host=smtp.host, smtp_port=smtp.port, alerts=alerts, **top,
        notifications={"auth0_url": auth0.url, "client_id": "m2m", "client_secret": SECRET,
                       "digest_window": 0, "check_interval": 0.2, "reconnect_url": LINK,
                       **notifications}))


@dataclass
class World:
    mongo: Mongo
    mailer: OwnerMailer
    store: NotificationStore
    tenant: str
    provider: str
    integration: str


@pytest.fixture
async def make_world(mongo: Mongo, auth0: FakeAuth0,
                     smtp: SmtpReceiver) -> AsyncIterator[Callable[..., Any]]:
    sessions: list[aiohttp.ClientSession] = []

    async def make(owner: str = "auth0|alice", **notifications: Any) -> World:
        settings = owner_settings(auth0, smtp, **notifications)
        assert missing(settings) == []
        http = aiohttp.ClientSession()
        sessions.append(http)
        store = NotificationStore(mongo)
        mailer = build(settings, store, ContactStore(mongo), IntegrationStore(mongo), http,
                       UrlPolicy(allow_loopback=True), lambda: datetime.now(UTC))
        tenant = await insert_tenant(mongo, owner, name="Acme Photos")
        provider = await insert_provider(mongo, test_cipher(), token_url="https://x.invalid/t",
                                         client_id="c", client_secret="s", name="Google Drive",
                                         slug="google-drive")
        integration = await insert_integration(mongo, test_cipher(), provider=provider,
                                               tenant_id=tenant)
        return World(mongo, mailer, store, tenant, provider.hex, integration)

    yield make
    for http in sessions:
        await http.close()


async def record(world: World, kind: str = "integration.expired",
                 integration: str | None = None) -> None:
    doc = await get_integration(world.mongo, integration or world.integration)
    assert doc is not None
    await world.store.record(kind, doc, "invalid_grant: Token has been expired or revoked "
                                        "(provider text, for operators only)",
                             datetime.now(UTC))


def parts(mail: Any) -> tuple[str, str]:
    text = mail.email.get_body(("plain",)).get_content()
    html = mail.email.get_body(("html",)).get_content()
    return text, html


async def test_the_owner_gets_one_email_with_a_text_and_an_html_part(
        make_world: Callable[..., Any], smtp: SmtpReceiver, auth0: FakeAuth0,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    world = await make_world()
    await record(world)
    report = await world.mailer.step()
    assert (report.emailed, report.notifications) == (1, 1)
    [mail] = smtp.messages
    assert mail.rcpt_tos == [ALICE]
    assert mail.email["Subject"] == "MWAP: Reconnect Google Drive (Acme Photos)"
    assert mail.email["From"] == "mwapjobs@example.com"
    text, html = parts(mail)
    link = f"https://app.example.com/tenants/{world.tenant}/reconnect?provider=google-drive"
    assert "Hello Alice Owner," in text and "Reconnect Google Drive in MWAP" in text
    assert f"Reconnect: {link}" in text
    assert f'<a href="{link}">Reconnect Google Drive</a>' in html
    outside_link = (text + html).replace(link, "")
    for raw in (world.tenant, world.provider, world.integration):
        assert raw not in outside_link  # names where names exist; ids only in the link
    for secret in (SECRET, "invalid_grant", "rt-seed", "at-seed"):
        assert secret not in text + html
    [doc] = await notifications(world.mongo)
    assert doc["delivered"] and doc["route"] == "owner" and doc["deliveredTo"] == ["owner-email"]
    assert doc["ownerEmail"]["to"] == "a***@example.com"
    logged = "\n".join(r.getMessage() + str(r.__dict__) for r in caplog.records
                        if r.name.startswith("mwapjobs"))
    assert ALICE not in logged and SECRET not in logged  # never in full, never the secret
    assert len(auth0.token_requests) == 1 and auth0.token_requests[0]["audience"] == \
        f"{auth0.url}/api/v2/"


async def test_one_email_per_episode_and_a_new_one_after_a_reconnect(
        make_world: Callable[..., Any], smtp: SmtpReceiver) -> None:
    world = await make_world()
    await record(world)
    await world.mailer.step()
    await record(world)  # the same expiry recorded again (another sweep, a retry)
    report = await world.mailer.step()
    assert (report.emailed, report.duplicates) == (0, 1)
    assert len(smtp.messages) == 1
    assert all(d["delivered"] for d in await notifications(world.mongo))
    cipher = test_cipher()
    await update_integration(world.mongo, world.integration,
                             {"refreshToken": cipher.encrypt("rt-after-reconnect")})
    await record(world)  # a new connection that expired: a new episode
    assert (await world.mailer.step()).emailed == 1
    assert len(smtp.messages) == 2


async def test_several_notifications_in_the_window_become_one_digest(
        make_world: Callable[..., Any], smtp: SmtpReceiver, mongo: Mongo) -> None:
    world = await make_world(digest_window=3600)
    dropbox = await insert_provider(mongo, test_cipher(), token_url="https://x.invalid/t",
                                    client_id="c", client_secret="s", name="Dropbox",
                                    slug="dropbox")
    second = await insert_integration(mongo, test_cipher(), provider=dropbox,
                                      tenant_id=world.tenant)
    await record(world)
    await record(world, "integration.revoked", second)
    assert (await world.mailer.step()).emailed == 0  # the window is still open
    world.mailer.settings = world.mailer.settings.model_copy(update={"digest_window": 0})
    report = await world.mailer.step()
    assert (report.emailed, report.notifications) == (1, 2)
    [mail] = smtp.messages
    assert mail.email["Subject"] == "MWAP: 2 storage connections need attention (Acme Photos)"
    text, html = parts(mail)
    assert "Google Drive: The connection to Google Drive has expired." in text
    assert "Dropbox: Access to Dropbox was revoked." in text
    assert html.count("<li>") == 2
    assert {d["ownerEmail"]["digest"] for d in await notifications(mongo)} == {2}


@pytest.mark.parametrize("owner", ["auth0|nobody", "auth0|unverified"])
async def test_no_address_to_use_goes_to_the_operators(
        make_world: Callable[..., Any], smtp: SmtpReceiver, auth0: FakeAuth0,
        owner: str) -> None:
    world = await make_world(owner=owner)
    await record(world)
    report = await world.mailer.step()
    assert report.to_operators == 1 and smtp.messages == []
    [doc] = await notifications(world.mongo)
    assert doc["route"] == "operators" and not doc["delivered"]
    assert doc["routeReason"] in ("no such user in Auth0",
                                  "the user's email address is not verified")
    # the operators' delivery takes exactly these (routed_only)
    claimed = await world.store.claim(datetime.now(UTC), datetime.now(UTC), routed_only=True)
    assert claimed is not None and claimed["_id"] == doc["_id"]
    await record(world, "integration.revoked")
    await world.mailer.step()
    assert len(auth0.user_requests) == 1  # the answer was remembered


async def test_auth0s_rate_limit_is_honoured(make_world: Callable[..., Any],
                                             smtp: SmtpReceiver, auth0: FakeAuth0) -> None:
    world = await make_world()
    auth0.rate_limit(times=1, retry_after="1")
    await record(world)
    report = await world.mailer.step()
    assert report.retrying == 1 and smtp.messages == []
    [doc] = await notifications(world.mongo)
    assert doc.get("attempts") is None  # a wait Auth0 asked for is no failed attempt
    assert (await world.mailer.step()).retrying == 0  # not before Retry-After
    assert len(auth0.user_requests) == 1

    async def sent() -> bool:
        await world.mailer.step()
        return len(smtp.messages) == 1

    await wait_for(sent, timeout=5, interval=0.2, message="the email after Retry-After")
    assert len(auth0.user_requests) == 2


async def test_the_token_is_cached_and_replaced_when_refused(
        make_world: Callable[..., Any], smtp: SmtpReceiver, auth0: FakeAuth0,
        mongo: Mongo) -> None:
    world = await make_world()
    auth0.users["auth0|bob"] = {"email": "bob@example.com", "email_verified": True}
    bob_tenant = await insert_tenant(mongo, "auth0|bob", name="Bob's")
    bob = await insert_integration(mongo, test_cipher(), provider=world.provider,
                                   tenant_id=bob_tenant)
    await record(world)
    await record(world, integration=bob)
    assert (await world.mailer.step()).emailed == 2
    assert len(auth0.token_requests) == 1  # one token for both look-ups
    auth0.revoke_tokens()
    auth0.users["auth0|carol"] = {"email": "carol@example.com", "email_verified": True}
    carol = await insert_integration(mongo, test_cipher(), provider=world.provider,
                                     tenant_id=await insert_tenant(mongo, "auth0|carol"))
    await record(world, integration=carol)
    assert (await world.mailer.step()).emailed == 1
    assert len(auth0.token_requests) == 2 and len(smtp.messages) == 3


async def test_wrong_client_credentials_never_leak_and_end_with_the_operators(
        make_world: Callable[..., Any], auth0: FakeAuth0) -> None:
    world = await make_world(client_secret="not-the-secret-either", lookup_attempts=2,
                             check_interval=0.05)
    await record(world)
    assert (await world.mailer.step()).retrying == 1
    [doc] = await notifications(world.mongo)
    assert doc["attempts"] == 1 and "refused the client credentials" in doc["lastError"]
    assert "not-the-secret-either" not in doc["lastError"]

    async def routed() -> bool:  # the next try, once it is due (after 0.05 s)
        await world.mailer.step()
        return (await notifications(world.mongo))[0].get("route") == "operators"

    await wait_for(routed, timeout=5, message="the notification to go to the operators")
    [doc] = await notifications(world.mongo)
    assert "after 2 tries" in doc["routeReason"]


async def test_starttls_and_login_through_the_alerting_smtp_client(
        make_world: Callable[..., Any], auth0: FakeAuth0, tmp_path: Path,
        mongo: Mongo) -> None:
    cert = self_signed(tmp_path)
    with SmtpReceiver(auth=("mailer", "pw-s3cret"), tls="starttls", cert=cert) as tls:
        settings = owner_settings(auth0, tls, {"smtp_user": "mailer", "smtp_pass": "pw-s3cret",
                                               "alerts": {"smtp_ca_file": str(cert.cert)}})
        async with aiohttp.ClientSession() as http:
            store = NotificationStore(mongo)
            mailer = build(settings, store, ContactStore(mongo), IntegrationStore(mongo), http,
                           UrlPolicy(allow_loopback=True), lambda: datetime.now(UTC))
            tenant = await insert_tenant(mongo, "auth0|alice", name="Acme")
            doc = {"_id": "i-tls", "tenantId": tenant, "providerId": None}
            await store.record("integration.expired", doc, "x", datetime.now(UTC))
            assert (await mailer.step()).emailed == 1
        assert tls.logins == [("mailer", True)] and len(tls.messages) == 1


# -- in a daemon: the background pass, the operators' fallback, a restart ----------------------


async def test_in_the_daemon_a_failed_send_survives_a_restart(
        mongo: Mongo, auth0: FakeAuth0, smtp: SmtpReceiver) -> None:
    tenant = await insert_tenant(mongo, "auth0|alice", name="Acme")
    nobody = await insert_tenant(mongo, "auth0|nobody", name="Ghost Inc")
    store = NotificationStore(mongo)
    for tenant_id, iid in ((tenant, "i-1"), (nobody, "i-2")):
        await store.record("integration.expired", {"_id": iid, "tenantId": tenant_id},
                           "reason", datetime.now(UTC))
    smtp.fail_next(100)
    first = Daemon(owner_settings(auth0, smtp), mongo=mongo)
    await first.start()
    await first.wait_ready()

    async def tried() -> bool:
        docs = {d["integrationId"]: d for d in await notifications(mongo)}
        return bool(docs["i-1"].get("attempts")) and bool(docs["i-2"].get("delivered"))

    await wait_for(tried, message="a failed send, and the operators' delivery")
    docs = {d["integrationId"]: d for d in await notifications(mongo)}
    assert docs["i-2"]["route"] == "operators" and "log" in docs["i-2"]["deliveredTo"]
    _, body = await call(first, "GET", "/api/v1/notifications/owner-emails")
    assert body["data"]["enabled"] is True and body["data"]["lastWeek"]["retrying"] == 1
    metrics = (await first.metrics.exposition()).decode()
    assert 'mwapjobs_owner_emails_total{outcome="operators"} 1.0' in metrics
    await first.stop()

    smtp.fail_next(0)
    second = Daemon(owner_settings(auth0, smtp), mongo=mongo)
    await second.start()
    await second.wait_ready()
    try:
        async def emailed() -> bool:
            docs = {d["integrationId"]: d for d in await notifications(mongo)}
            return docs["i-1"].get("route") == "owner"

        await wait_for(emailed, timeout=15, message="the email after the restart")
        assert [m.rcpt_tos for m in smtp.messages] == [[ALICE]]
        [doc] = [d for d in await notifications(mongo) if d["integrationId"] == "i-1"]
        assert doc["delivered"] and doc["attempts"] >= 1
    finally:
        await second.stop()


async def test_without_auth0_credentials_the_operators_get_them_as_before(
        mongo: Mongo, smtp: SmtpReceiver) -> None:
    settings = make_settings(**with_admin(refresh={"enabled": False},
                                          health={"enabled": False}, smtp_host=smtp.host,
                                          smtp_port=smtp.port, alerts={"check_interval": 0.2}))
    assert "AUTH0_CLIENT_ID (or notifications.client_id) is not set" in missing(settings)
    tenant = await insert_tenant(mongo, "auth0|alice")
    await NotificationStore(mongo).record("integration.expired", {"_id": "i", "tenantId": tenant},
                                          "reason", datetime.now(UTC))
    daemon = Daemon(settings, mongo=mongo)
    await daemon.start()
    await daemon.wait_ready()
    try:
        async def delivered() -> bool:
            return bool((await notifications(mongo))[0].get("delivered"))

        await wait_for(delivered, message="the operators' delivery")
        [doc] = await notifications(mongo)
        assert doc.get("route") is None and doc["deliveredTo"] == ["log"]
        assert daemon.jobs["notifications"] is None
        _, body = await call(daemon, "GET", "/api/v1/notifications/owner-emails")
        assert body["data"]["enabled"] is False and body["data"]["offBecause"]
    finally:
        await daemon.stop()
