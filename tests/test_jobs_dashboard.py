"""The dashboard's panels of upkeep, owner emails, analytics and the file index, in
Debian's chromium (Playwright, as tests/test_dashboard.py): each shows what its endpoint
says, the trend chart is drawn from the real snapshots, and nothing breaks the page's
CSP."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from bson import ObjectId

from mwapjobs.daemon import Daemon
from mwapjobs.storage.mongo import Mongo
from mwapjobs.storage.names import ANALYTICS_DAILY, FILE_INDEX, PROJECTS
from tests.conftest import ROOT, make_settings
from tests.support.admin import ADMIN_TOKEN, call, with_admin
from tests.support.mwap_data import insert_all, insert_tenant

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.skipif(not CHROMIUM.exists(),
                    reason="needs Debian's chromium at /usr/bin/chromium (.ci/setup installs it)")
async def test_the_job_panels_in_chromium(mongo: Mongo) -> None:
    from playwright.async_api import async_playwright, expect

    await insert_tenant(mongo, "auth0|owner", name="Acme")
    await mongo.call(lambda db: db[PROJECTS].insert_one(
        {"_id": "p-orphan", "tenantId": str(ObjectId()), "name": "left behind"}))
    today = datetime.now(UTC).date()
    for back, tenants in ((2, 1), (1, 1)):  # two earlier days, as earlier runs left them
        day = (today - timedelta(days=back)).isoformat()
        await mongo.call(lambda db, day=day, n=tenants: db[ANALYTICS_DAILY].insert_one(
            {"_id": f"platform:{day}", "tenantId": None, "day": day, "scope": "platform",
             "tenants": n, "projects": {"total": 0}, "integrations": {"connected": 0},
             "refresh": {"refreshed": 5, "transientFailure": 1, "permanentFailure": 0},
             "quota": {"used": 2**30}}))
    now = datetime.now(UTC)
    summaries = [  # as file indexing leaves them: one synced, one failing
        {"_id": "p-synced", "state": "synced", "name": "Docs", "kind": "dropbox",
         "folderpath": "/Docs", "fileCount": 12, "folderCount": 2, "totalSize": 2**20,
         "lastSync": now},
        {"_id": "p-failing", "state": "error", "name": "Clients", "kind": "google",
         "folderpath": "/Clients", "failingSince": now - timedelta(hours=2),
         "lastError": {"code": "files/folder-not-found",
                       "message": "no folder named 'Clients' in / on Google Drive", "at": now}}]
    await insert_all(mongo, FILE_INDEX, summaries)
    settings = make_settings(**with_admin(
        refresh={"enabled": False}, health={"enabled": False}, smtp_host="127.0.0.1",
        admin={"tokens": with_admin()["admin"]["tokens"], "cookie_secure": False}))
    daemon = Daemon(settings, mongo=mongo)
    await daemon.start()
    await daemon.wait_ready()
    try:
        await daemon.jobs["maintenance"].run()
        await daemon.jobs["analytics"].run()
        _, report = await call(daemon, "GET", "/api/v1/maintenance/report")
        orphans = report["data"]["report"]["orphans"]["projectsWithoutTenant"]["count"]
        assert orphans == 1
        url = f"http://127.0.0.1:{daemon.port}"
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
            page = await (await browser.new_context(viewport={"width": 1280, "height": 1400})
                          ).new_page()
            problems: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error"
                    and not m.text.startswith("Failed to load resource") else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            try:
                await page.goto(f"{url}/admin/login")
                await page.fill("input[name=token]", ADMIN_TOKEN)
                await page.click("button[type=submit]")
                await expect(page.locator("body[data-loaded=true]")).to_have_count(1)

                trend = page.locator("#analytics-section")
                await expect(trend).to_be_visible()
                await expect(trend.locator(".trend")).to_have_count(6)
                tenants = trend.locator("[data-trend='tenants']")
                await expect(tenants.locator("circle")).to_have_count(3)  # three days drawn
                await expect(tenants.locator("b")).to_have_text("1")
                await expect(trend.locator("[data-trend='refresh failures'] circle")
                             ).to_have_count(3)
                await expect(trend.locator("[data-trend='storage used'] b")
                             ).to_have_text("0.0 GiB")  # today: no quota read (no integrations)

                upkeep = page.locator("#maintenance-section")
                await expect(upkeep).to_be_visible()
                orphan_stat = upkeep.locator("[data-stat='projectsWithoutTenant']")
                await expect(orphan_stat.locator("b")).to_have_text(str(orphans))
                await expect(orphan_stat).to_have_class("stat warn")
                await expect(upkeep.locator("[data-list='missing-indexes'] li").first
                             ).to_contain_text("backend: tenants {ownerId} unique")

                emails = page.locator("#owner-emails-section")
                await expect(emails).to_be_visible()
                await expect(emails).to_contain_text("AUTH0_CLIENT_ID")  # why it is off

                files = page.locator("#file-index-section")
                await expect(files).to_be_visible()
                await expect(files.locator("[data-stat='failing'] b")).to_have_text("1")
                await expect(files.locator("[data-stat='failing']")).to_have_class("stat warn")
                await expect(files.locator("[data-stat='files'] b")).to_have_text("12")
                rows = files.locator("[data-list='file-index'] tbody tr")
                await expect(rows).to_have_count(2)
                await expect(rows.first).to_have_attribute("data-project", "p-failing")
                await expect(rows.first).to_contain_text("files/folder-not-found: no folder")
                await expect(rows.nth(1)).to_contain_text("/Docs")
                shot: Any = ROOT / "artifacts" / "jobs-dashboard.png"
                shot.parent.mkdir(exist_ok=True)
                await page.screenshot(path=str(shot), full_page=True)
            finally:
                await browser.close()
            assert problems == []
    finally:
        await daemon.stop()
