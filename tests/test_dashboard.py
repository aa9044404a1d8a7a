"""The operator dashboard at /admin/queues: sessions, CSRF, headers, and a real browser.

The HTTP-level tests talk to an in-process daemon with aiohttp. The browser test
drives Debian's `chromium` (never a downloaded build: `playwright install` is not
used) through Playwright: log in, compare the counts with the API, retry a
failed run by clicking, and keep a screenshot under artifacts/.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from mwapjobs.api.auth import Authenticator, Caller
from mwapjobs.api.dashboard import (
    COOKIE,
    CSP,
    FAILED_LOGIN_WINDOW,
    MAX_FAILED_LOGINS,
    SessionStore,
)
from mwapjobs.daemon import Daemon
from mwapjobs.queues import Job, PermanentError
from mwapjobs.storage.identity import IdentityStore
from mwapjobs.storage.mongo import Mongo
from tests.conftest import ROOT, make_settings, wait_for
from tests.support.jwks import JwksServer

TOKEN = "mwj_dashboard-test-token-0123456789abcdef"
SECRET = "ya29.do-not-show-this-access-token"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
ARTIFACTS = ROOT / "artifacts"


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def dashboard_settings(**admin: Any) -> Any:
    return make_settings(
        admin={"tokens": [{"name": "ops", "sha256": sha256(TOKEN)}], "cookie_secure": False,
               **admin},
        refresh={"enabled": False}, health={"enabled": False},
    )


class Reports:
    """A queue handler that fails for good on `fail` data the first time, then succeeds."""

    def __init__(self) -> None:
        self.failed_once: set[str] = set()

    async def __call__(self, job: Job) -> dict[str, Any]:
        if job.data.get("fail") and job.run_id not in self.failed_once:
            self.failed_once.add(job.run_id)
            raise PermanentError(f"report {job.data.get('n')}: the storage provider said 403")
        return {"rows": 10 * int(job.data.get("n", 0))}


@pytest.fixture
async def daemon(mongo: Mongo) -> AsyncIterator[Daemon]:
    """A daemon with a `reports` queue (completed, failed, delayed runs and a repeat) and a
    paused `emails` queue with waiting runs."""
    d = Daemon(dashboard_settings(), mongo=mongo)
    d.registry.register("reports", Reports(), attempts=1)

    async def send(job: Job) -> None:
        return None

    d.registry.register("emails", send)
    await d.start()
    await d.wait_ready()
    engine = d.engine
    for n in range(1, 4):
        await engine.add("reports", {"n": n, "tenant": "acme"}, job_id=f"report-{n}")
    await engine.add("reports", {"n": 4, "fail": True, "tenant": "globex"}, job_id="report-4")
    await engine.add("reports", {"n": 5, "fail": True, "accessToken": SECRET}, job_id="report-5")
    await engine.add("reports", {"n": 6}, job_id="report-6", delay=3600)
    await engine.add("reports", {"n": 7}, job_id="report-7", delay=7200)
    await engine.repeat("reports", {"kind": "nightly"}, cron="30 4 * * *",
                        timezone="Europe/Paris", job_id="nightly")
    await d.operations.pause("emails")
    for n in range(2):
        await engine.add("emails", {"to": f"ops{n}@example.com"})

    async def settled() -> bool:
        counts = (await d.operations.stats())["reports"]
        return bool(counts["completed"] == 3 and counts["failed"] == 2)

    await wait_for(settled, message="the sample runs to finish")
    yield d
    await d.stop()


def base(daemon: Daemon) -> str:
    return f"http://127.0.0.1:{daemon.port}"


def client(daemon: Daemon) -> aiohttp.ClientSession:
    """A browser-like client: keeps cookies for 127.0.0.1, sends our own Origin."""
    return aiohttp.ClientSession(base(daemon), cookie_jar=aiohttp.CookieJar(unsafe=True),
                                 headers={"Origin": base(daemon)})


async def log_in(http: aiohttp.ClientSession, token: str = TOKEN) -> aiohttp.ClientResponse:
    async with http.post("/admin/login", data={"token": token}, allow_redirects=False) as r:
        await r.read()
        return r


async def csrf_token(http: aiohttp.ClientSession) -> str:
    async with http.get("/admin/session") as r:
        assert r.status == 200
        body = await r.json()
    token: str = body["data"]["csrfToken"]
    return token


def bearer() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


# -- HTTP level ------------------------------------------------------------------------------


async def test_login_sets_a_strict_httponly_session_cookie(daemon: Daemon) -> None:
    async with client(daemon) as http:
        r = await log_in(http)
        assert r.status == 303
        assert r.headers["Location"] == "/admin/queues"
        cookie = r.cookies[COOKIE]
        assert len(cookie.value) >= 40
        assert cookie["httponly"] is True
        assert cookie["samesite"] == "Strict"
        assert cookie["path"] == "/"
        assert not cookie["secure"]  # cookie_secure = false in this test's settings
        assert cookie["max-age"] == str(int(daemon.settings.admin.session_ttl))
        async with http.get("/admin/queues", allow_redirects=False) as page:
            assert page.status == 200
            assert page.content_type == "text/html"
            assert '<script src="/admin/static/app.js"' in await page.text()
        async with http.get("/admin/session") as s:
            data = (await s.json())["data"]
        assert data["actor"] == "token:ops"
        assert {"name": "reports", "statsKey": "reports"} in data["queues"]
        # The session works for the REST API too, and shows secrets redacted.
        async with http.get("/api/v1/queues/reports/runs", params={"state": "failed"}) as runs:
            assert runs.status == 200
            text = await runs.text()
        assert SECRET not in text
        assert "[redacted]" in text


async def test_the_cookie_is_secure_when_configured(mongo: Mongo) -> None:
    daemon = Daemon(dashboard_settings(cookie_secure=True, session_ttl=600), mongo=mongo)
    async with TestClient(TestServer(daemon.app())) as http:
        r = await http.post("/admin/login", data={"token": TOKEN}, allow_redirects=False)
        assert r.status == 303
        cookie = r.cookies[COOKIE]
        assert cookie["secure"] is True
        assert cookie["httponly"] is True
        assert cookie["samesite"] == "Strict"
        assert cookie["max-age"] == "600"
        assert "Secure" in r.headers["Set-Cookie"]


async def test_without_a_session_the_page_redirects_and_the_api_says_401(daemon: Daemon) -> None:
    async with client(daemon) as http:
        async with http.get("/admin/queues", allow_redirects=False) as r:
            assert r.status == 303
            assert r.headers["Location"] == "/admin/login"
        async with http.get("/admin", allow_redirects=False) as r:
            assert r.headers["Location"] == "/admin/queues"
        async with http.get("/admin/login") as r:
            assert r.status == 200
            page = await r.text()
            assert '<form method="post" action="/admin/login"' in page
            assert 'name="token"' in page
        for method, path in [("GET", "/api/v1/queues/stats"), ("GET", "/admin/session"),
                             ("POST", "/api/v1/queues/reports/pause")]:
            async with http.request(method, path) as r:
                assert r.status == 401, path
                body = await r.json()
                assert body["success"] is False
                assert body["error"]["code"] == "auth/unauthorized"
        # A made-up cookie is no session either.
        http.cookie_jar.update_cookies({COOKIE: "forged-session-id"})
        async with http.get("/api/v1/queues/stats") as r:
            assert r.status == 401


async def test_a_bad_token_at_login_gets_401_and_no_cookie(daemon: Daemon) -> None:
    async with client(daemon) as http:
        r = await log_in(http, TOKEN + "x")
        assert r.status == 401
        assert COOKIE not in r.cookies
        async with http.post("/admin/login", data={"token": "nope"}) as r:
            page = await r.text()
        assert r.content_type == "text/html"
        assert "That token is not valid." in page
        assert "nope" not in page  # the credential is never echoed
        async with http.post("/admin/login", data={"token": "  "}) as r:
            assert r.status == 400
            assert "Enter an admin token." in await r.text()
        async with http.get("/admin/session") as r:
            assert r.status == 401


async def test_failed_logins_are_throttled_per_address(daemon: Daemon) -> None:
    """Guessing admin tokens at the login form: after MAX_FAILED_LOGINS failures from one
    address within the window, every attempt from it (the right token too) gets 429 with
    Retry-After and is not even checked; a good login before that clears the count."""
    async with client(daemon) as http:
        for _ in range(MAX_FAILED_LOGINS - 1):
            assert (await log_in(http, "guess")).status == 401
        assert (await log_in(http)).status == 303  # clears the count
        for _ in range(MAX_FAILED_LOGINS):
            assert (await log_in(http, "guess")).status == 401
        for token in ("guess", TOKEN):
            async with http.post("/admin/login", data={"token": token},
                                 allow_redirects=False) as r:
                assert r.status == 429
                assert 0 < int(r.headers["Retry-After"]) <= FAILED_LOGIN_WINDOW + 1
                assert "Too many failed logins" in await r.text()
                assert COOKIE not in r.cookies


async def test_a_login_posted_from_another_site_is_refused(daemon: Daemon) -> None:
    async with aiohttp.ClientSession(base(daemon), cookie_jar=aiohttp.CookieJar(unsafe=True)) as h:
        for headers in ({"Origin": "https://evil.example"}, {"Origin": "null"},
                        {"Referer": "https://evil.example/page"},
                        {"Sec-Fetch-Site": "cross-site", "Origin": base(daemon)}):
            async with h.post("/admin/login", data={"token": TOKEN}, headers=headers,
                              allow_redirects=False) as r:
                assert r.status == 403, headers
                assert COOKIE not in r.cookies
        # Same origin, and a non-browser client that sends no Origin at all, may log in.
        for headers in ({"Origin": base(daemon)}, {}):
            async with h.post("/admin/login", data={"token": TOKEN}, headers=headers,
                              allow_redirects=False) as r:
                assert r.status == 303, headers


async def test_cookie_sessions_need_the_csrf_token_to_change_anything(daemon: Daemon) -> None:
    failed = (await daemon.operations.list_runs("reports", "failed"))["items"]
    run_id = failed[0]["runId"]
    async with client(daemon) as http:
        await log_in(http)
        token = await csrf_token(http)
        for headers in ({}, {"X-CSRF-Token": "wrong"}, {"X-CSRF-Token": token[:-1]},
                        {"X-CSRF-Token": ""}):
            async with http.post("/api/v1/queues/reports/pause", headers=headers) as r:
                assert r.status == 403, headers
                assert (await r.json())["error"]["code"] == "auth/csrf"
            async with http.delete(f"/api/v1/queues/runs/{run_id}", headers=headers) as r:
                assert r.status == 403
            async with http.post("/admin/logout", headers=headers) as r:
                assert r.status == 403
        assert not daemon.engine.is_paused("reports")
        assert (await daemon.operations.get_run(run_id))["state"] == "failed"
        async with http.get("/api/v1/queues/stats") as r:  # reading needs no CSRF token
            assert r.status == 200
        async with http.post("/api/v1/queues/reports/pause",
                             headers={"X-CSRF-Token": token}) as r:
            assert r.status == 200
            assert (await r.json())["data"] == {"queue": "reports", "isPaused": True}
        assert daemon.engine.is_paused("reports")
        # A bearer-token call is not an ambient credential: no CSRF token needed, cookie or not.
        async with http.post("/api/v1/queues/reports/resume", headers=bearer()) as r:
            assert r.status == 200
        assert not daemon.engine.is_paused("reports")


async def test_logout_invalidates_the_session(daemon: Daemon) -> None:
    async with client(daemon) as http:
        r = await log_in(http)
        sid = r.cookies[COOKIE].value
        token = await csrf_token(http)
        async with http.post("/admin/logout", headers={"X-CSRF-Token": token}) as r:
            assert r.status == 200
            assert r.cookies[COOKIE].value == ""
            assert r.cookies[COOKIE]["max-age"] == "0"
    # The old cookie, replayed, is worth nothing now.
    async with aiohttp.ClientSession(base(daemon), cookie_jar=aiohttp.CookieJar(unsafe=True),
                                     cookies={COOKIE: sid}) as replay:
        async with replay.get("/admin/session") as r:
            assert r.status == 401
        async with replay.get("/admin/queues", allow_redirects=False) as r:
            assert r.status == 303
            assert r.headers["Location"] == "/admin/login"
        async with replay.post("/api/v1/queues/reports/pause",
                               headers={"X-CSRF-Token": token}) as r:
            assert r.status == 401
    assert not daemon.engine.is_paused("reports")


async def test_every_dashboard_response_has_a_strict_csp(daemon: Daemon) -> None:
    async with client(daemon) as http:
        async with http.get("/admin/login") as r:
            assert r.headers["Content-Security-Policy"] == CSP
            login_page = await r.text()
        await log_in(http)
        pages = {}
        for path, kind in [("/admin/queues", "text/html"),
                           ("/admin/static/app.js", "text/javascript"),
                           ("/admin/static/style.css", "text/css"),
                           ("/admin/session", "application/json")]:
            async with http.get(path) as r:
                assert r.status == 200, path
                assert r.content_type == kind
                csp = r.headers["Content-Security-Policy"]
                assert "default-src 'self'" in csp
                assert "script-src 'self'" in csp and "unsafe-inline" not in csp
                assert "frame-ancestors 'none'" in csp
                assert r.headers["X-Content-Type-Options"] == "nosniff"
                assert r.headers["X-Frame-Options"] == "DENY"
                pages[path] = await r.text()
        async with http.get("/admin/static/../../config.py") as r:
            assert r.status == 404
        async with http.get("/admin/static/nope.js") as r:
            assert r.status == 404
    # Nothing inline that the CSP would block, and nothing from another origin.
    for page in (login_page, pages["/admin/queues"]):
        assert not re.search(r"<script(?![^>]*\bsrc=)", page)
        assert not re.search(r"\son\w+\s*=", page)
        assert " style=" not in page and "<style" not in page
        assert "http://" not in page and "https://" not in page
    script = pages["/admin/static/app.js"]
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script
    assert "eval(" not in script


async def test_jwt_sessions_follow_the_users_role_and_the_tokens_expiry(mongo: Mongo) -> None:
    async with JwksServer() as idp:
        settings = make_settings(
            admin={"tokens": [], "cookie_secure": False}, auth0_domain="idp.test",
            auth0_audience=idp.audience, refresh={"enabled": False}, health={"enabled": False})
        daemon = Daemon(settings, mongo=mongo)
        jwks = idp.cache()
        daemon.auth = Authenticator(settings, IdentityStore(mongo), jwks)
        boss = "auth0|boss"
        await mongo.call(lambda db: db.superadmins.insert_one({"userId": boss}))
        try:
            async with TestClient(TestServer(daemon.app())) as http:
                r = await http.post("/admin/login", data={"token": idp.token("auth0|someone")},
                                    allow_redirects=False)
                assert r.status == 403
                assert "not an admin" in await r.text()
                exp = int(time.time()) + 120
                r = await http.post("/admin/login", data={"token": idp.token(boss, exp=exp)},
                                    allow_redirects=False)
                assert r.status == 303
                assert 100 <= int(r.cookies[COOKIE]["max-age"]) <= 120  # not the 12 h TTL
                r = await http.get("/admin/session")
                assert (await r.json())["data"]["actor"] == f"user:{boss}"
                # Revoking the superadmin role takes effect at the next request.
                await mongo.call(lambda db: db.superadmins.delete_many({"userId": boss}))
                r = await http.get("/admin/queues", allow_redirects=False)
                assert r.status == 303
                r = await http.get("/api/v1/queues/repeats")
                assert r.status == 403
        finally:
            await jwks.close()


def test_the_session_store_expires_and_bounds_sessions() -> None:
    now = [100.0]
    store = SessionStore(ttl=60, clock=lambda: now[0], max_sessions=3)
    caller = Caller("token", "ops", superadmin=True)
    sid, session = store.create(caller)
    assert store.get(sid) is session
    assert store.get(sid + "x") is None
    short, _ = store.create(caller, ttl=10)
    now[0] += 30
    assert store.get(short) is None
    assert store.get(sid) is session
    now[0] += 30
    assert store.get(sid) is None
    ids = [store.create(caller)[0] for _ in range(5)]
    assert len(store) == 3
    assert store.get(ids[0]) is None and store.get(ids[-1]) is not None
    assert sid not in str(store._sessions)  # only hashes of the ids are kept
    store.drop(ids[-1])
    assert store.get(ids[-1]) is None


# -- in a real browser --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(),
                    reason="needs Debian's chromium at /usr/bin/chromium (.ci/setup installs it)")
async def test_dashboard_in_chromium(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    from playwright.async_api import async_playwright, expect

    url = base(daemon)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                           headless=True)
        context = await browser.new_context(viewport={"width": 1440, "height": 1200})
        page = await context.new_page()
        problems: list[str] = []
        # Script errors and CSP violations; the browser's own lines about 401/404 answers
        # (the wrong token below, the optional integrations health endpoint) are expected.
        page.on("console", lambda m: problems.append(m.text) if m.type == "error"
                and not m.text.startswith("Failed to load resource") else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        answers: list[bool] = []  # how to answer the next confirmation dialogs

        async def on_dialog(dialog: Any) -> None:
            await (dialog.accept() if answers.pop(0) else dialog.dismiss())

        page.on("dialog", on_dialog)
        try:
            # Log in.
            await page.goto(f"{url}/admin/queues")
            await expect(page).to_have_url(f"{url}/admin/login")
            await page.fill("input[name=token]", "not-the-token")
            await page.click("button[type=submit]")
            await expect(page.locator(".login-error")).to_have_text("That token is not valid.")
            await page.screenshot(path=str(ARTIFACTS / "dashboard-login.png"))
            await page.fill("input[name=token]", TOKEN)
            await page.click("button[type=submit]")
            await expect(page).to_have_url(f"{url}/admin/queues")
            await expect(page.locator("#actor")).to_have_text("token:ops")
            cookies = await context.cookies()
            assert [c["httpOnly"] for c in cookies if c["name"] == COOKIE] == [True]
            assert await page.evaluate("document.cookie") == ""  # HttpOnly: not for scripts

            # The counts on the page are the API's.
            async with aiohttp.ClientSession(url, headers=bearer()) as api, \
                    api.get("/api/v1/queues/stats") as r:
                stats = (await r.json())["data"]
            assert stats["reports"]["failed"] == 2 and stats["emails"]["paused"] == 2
            for queue in ("reports", "emails"):
                row = page.locator(f"#queue-rows tr[data-queue='{queue}']")
                for state in ("waiting", "active", "delayed", "completed", "failed", "paused"):
                    await expect(row.locator(f"[data-count='{state}']")).to_have_text(
                        str(stats[queue][state]))
            await expect(page.locator("#queue-rows tr[data-queue='emails'] .badge")).to_have_text(
                "paused")

            # The repeat schedule and its next fire time.
            repeat = page.locator("#repeat-rows tr[data-repeat='reports:nightly']")
            await expect(repeat).to_contain_text("30 4 * * *")
            await expect(repeat).to_contain_text("Europe/Paris")
            await expect(repeat).to_contain_text("04:30 Europe/Paris")
            assert await repeat.locator("[data-next-run]").get_attribute("data-next-run")

            # The failed runs of `reports`, with their data and errors, secrets masked.
            await page.locator("#queue-rows tr[data-queue='reports'] [data-count='failed']").click()
            rows = page.locator("#run-rows tr[data-run-id]")
            await expect(rows).to_have_count(2)
            await expect(page.locator("#run-rows")).to_contain_text("the storage provider said 403")
            await expect(page.locator("#run-rows")).to_contain_text("[redacted]")
            secret_row = page.locator("#run-rows tr", has_text="report-5")
            await secret_row.locator("[data-action=details]").click()
            await expect(page.locator("#detail-data")).to_contain_text(
                '"accessToken": "[redacted]"')
            await expect(page.locator("#attempt-rows")).to_contain_text("failed")
            assert SECRET not in await page.content()

            # Retry one by clicking.
            target = page.locator("#run-rows tr", has_text="report-4")
            run_id = await target.get_attribute("data-run-id")
            assert run_id
            await target.locator("[data-action=retry]").click()
            await expect(page.locator("#notice")).to_contain_text("retried")
            async with aiohttp.ClientSession(url, headers=bearer()) as api:

                async def completed() -> bool:
                    async with api.get(f"/api/v1/queues/runs/{run_id}") as r:
                        run = (await r.json())["data"]
                    assert run["state"] in ("waiting", "active", "completed"), run["state"]
                    return bool(run["state"] == "completed")

                await wait_for(completed, message="the retried run to complete")
            await page.click("#refresh-now")
            await expect(rows).to_have_count(1)
            await expect(page.locator(
                "#queue-rows tr[data-queue='reports'] [data-count='completed']")).to_have_text("4")

            await page.evaluate("window.scrollTo(0, 0)")
            await page.screenshot(path=str(shot), full_page=True)

            # Delayed runs: promote one; remove the other, after a dismissed confirmation.
            await page.locator("#state-tabs [data-state=delayed]").click()
            await expect(rows).to_have_count(2)
            await page.locator("#run-rows tr", has_text="report-6").locator(
                "[data-action=promote]").click()
            await expect(page.locator("#notice")).to_contain_text("promoted")
            answers.extend([False, True])
            remove = page.locator("#run-rows tr", has_text="report-7").locator(
                "[data-action=remove]")
            await remove.click()
            await wait_for(lambda: answers == [True], message="the dismissed confirmation")
            delayed = (await daemon.operations.list_runs("reports", "delayed"))["items"]
            assert [r["jobId"] for r in delayed] == ["report-7"]
            await remove.click()
            await expect(page.locator("#notice")).to_contain_text("Removed")
            await expect(rows).to_have_count(0)
            assert (await daemon.operations.list_runs("reports", "delayed"))["total"] == 0

            # Resume the paused queue: its runs complete, and auto-refresh shows it.
            emails = page.locator("#queue-rows tr[data-queue='emails']")
            await emails.locator("[data-action=resume]").click()
            await expect(emails.locator(".badge")).to_have_text("running")
            await expect(emails.locator("[data-count='completed']")).to_have_text(
                "2", timeout=15_000)
            await expect(emails.locator("[data-count='paused']")).to_have_text("0")
            assert problems == []
        except BaseException:
            await page.screenshot(path=str(ARTIFACTS / "dashboard-failure.png"), full_page=True)
            raise
        finally:
            await browser.close()
    with capsys.disabled():
        print(f"\ndashboard screenshot: {shot}")
    assert shot.stat().st_size > 10_000

