"""The operators' dashboard of issue 15 §3 in Debian's chromium (Playwright, as
tests/test_dashboard.py), at 800 px wide: find a run, a bulk retry after a confirmation
that shows the count, the throughput chart drawn from the real per-minute counts, a
repeat run by hand, and a viewer who sees everything and can act on nothing."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mwapjobs.daemon import Daemon
from mwapjobs.queues import Job, PermanentError
from mwapjobs.storage.mongo import Mongo
from tests.conftest import ROOT, make_settings, wait_for

ADMIN = "mwj_ops-dashboard-admin-0123456789"
VIEWER = "mwj_ops-dashboard-viewer-0123456789"
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = ROOT / "artifacts"
WIDTH = 800


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class Reports:
    def __init__(self) -> None:
        self.failing = True

    async def __call__(self, job: Job) -> str:
        if job.data.get("fail") and self.failing:
            raise PermanentError(f"report {job.data['n']}: the provider said 403")
        return "ok"


@pytest.fixture
async def daemon(mongo: Mongo) -> AsyncIterator[Daemon]:
    settings = make_settings(
        admin={"tokens": [{"name": "ops", "sha256": sha(ADMIN)},
                          {"name": "wall", "sha256": sha(VIEWER), "role": "viewer"}],
               "cookie_secure": False},
        refresh={"enabled": False}, health={"enabled": False})
    d = Daemon(settings, mongo=mongo)
    d.registry.register("reports", Reports(), attempts=1)
    await d.start()
    await d.wait_ready()
    for n in range(1, 4):
        await d.engine.add("reports", {"n": n, "integrationId": f"int-{n}"},
                           job_id=f"integration:int-{n}")
        await d.engine.add("reports", {"n": 10 + n, "fail": True, "integrationId": f"int-{n}"},
                           job_id=f"report-fail-{n}")
    await d.engine.repeat("reports", {"n": 99}, cron="0 3 * * *", job_id="nightly")

    async def settled() -> bool:
        counts = (await d.operations.stats())["reports"]
        return bool(counts["completed"] == 3 and counts["failed"] == 3)

    await wait_for(settled, message="the sample runs to finish")
    # The next run of a job id that has finished once: the search finds both.
    await d.engine.add("reports", {"n": 20, "integrationId": "int-2"},
                       job_id="integration:int-2", delay=3600)
    yield d
    await d.stop()


async def api(daemon: Daemon, method: str, path: str, **kwargs: Any) -> Any:
    async with aiohttp.ClientSession(f"http://127.0.0.1:{daemon.port}",
                                     headers={"Authorization": f"Bearer {ADMIN}"}) as http, \
            http.request(method, path, **kwargs) as r:
        return (await r.json())["data"]


async def log_in(browser: Any, url: str, token: str) -> tuple[Any, Any, list[str]]:
    from playwright.async_api import expect

    context = await browser.new_context(viewport={"width": WIDTH, "height": 1000})
    page = await context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error"
            and not m.text.startswith("Failed to load resource") else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    await page.goto(f"{url}/admin/login")
    await page.fill("input[name=token]", token)
    await page.click("button[type=submit]")
    await expect(page).to_have_url(f"{url}/admin/queues")
    await expect(page.locator("body")).to_have_attribute("data-loaded", "true")
    return context, page, problems


async def in_reach(locator: Any) -> None:
    """Visible, and inside the 800 px viewport without scrolling sideways."""
    await locator.scroll_into_view_if_needed()
    box = await locator.bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= WIDTH, box


@pytest.mark.skipif(not CHROMIUM.exists(),
                    reason="needs Debian's chromium at /usr/bin/chromium (.ci/setup installs it)")
async def test_operators_dashboard_in_chromium(daemon: Daemon) -> None:
    from playwright.async_api import async_playwright, expect

    url = f"http://127.0.0.1:{daemon.port}"
    ARTIFACTS.mkdir(exist_ok=True)
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS,
                                           headless=True)
        context, page, problems = await log_in(browser, url, ADMIN)
        dialogs: list[str] = []

        async def on_dialog(dialog: Any) -> None:
            dialogs.append(dialog.message)
            await dialog.accept()

        page.on("dialog", on_dialog)
        try:
            await expect(page.locator("#read-only")).to_be_hidden()

            # Find a run: by job id across states, then by a data field.
            await page.fill("#search-job", "integration:int-2")
            await page.click("#search-go")
            rows = page.locator("#search-rows tr[data-run-id]")
            await expect(rows).to_have_count(2)
            await expect(page.locator("#search-rows")).to_contain_text("delayed")
            await expect(page.locator("#search-rows")).to_contain_text("completed")
            await expect(page.locator("#search-info")).to_contain_text("2 runs found")
            await page.fill("#search-job", "")
            await page.select_option("#search-field", "integrationId")
            await page.fill("#search-value", "int-3")
            await page.select_option("#search-state", "failed")
            await page.click("#search-go")
            await expect(rows).to_have_count(1)
            await expect(rows.first).to_contain_text("report-fail-3")
            await expect(rows.first).to_contain_text("the provider said 403")

            # The throughput chart: drawn from the per-minute counters, as the API says.
            chart = page.locator("[data-throughput=reports]")
            series = (await api(daemon, "GET", "/api/v1/queues/throughput"))["queues"]["reports"]
            assert series["total"] == {"completed": 3, "failed": 3}
            await expect(chart).to_have_attribute("data-completed", "3")
            await expect(chart).to_have_attribute("data-failed", "3")
            drawn = await chart.locator("rect").evaluate_all(
                "rs => rs.map(r => [r.getAttribute('class'), Number(r.dataset.minute),"
                " Number(r.dataset.count)])")
            expected = sorted([("tp-completed", i, v) for i, v in enumerate(series["completed"])
                               if v] + [("tp-failed", i, v)
                                        for i, v in enumerate(series["failed"]) if v])
            assert sorted(tuple(d) for d in drawn) == expected

            # The failed runs: a row's retry is in reach at 800 px, and so is the bulk retry.
            await page.locator("#queue-rows tr[data-queue='reports'] [data-count='failed']").click()
            await expect(page.locator("#run-rows tr[data-run-id]")).to_have_count(3)
            await in_reach(page.locator("#run-rows tr[data-run-id]").first.locator(
                "[data-action=retry]"))
            await in_reach(page.locator("#bulk-retry"))
            await page.screenshot(path=str(ARTIFACTS / "dashboard-800.png"), full_page=True)
            reports = daemon.registry.get("reports").handler
            assert isinstance(reports, Reports)
            reports.failing = False
            await page.click("#bulk-retry")
            await expect(page.locator("#notice")).to_contain_text("Retried 3 of 3 failed runs")
            assert len(dialogs) == 1 and dialogs[0].startswith("Retry 3 failed runs of reports")
            assert "PermanentError: 3" in dialogs[0]

            async def retried() -> bool:
                counts = (await daemon.operations.stats())["reports"]
                return bool(counts["failed"] == 0 and counts["completed"] == 6)

            await wait_for(retried, message="the bulk-retried runs to complete")
            await page.click("#refresh-now")
            await expect(page.locator("#run-rows tr[data-run-id]")).to_have_count(0)
            await expect(chart).to_have_attribute("data-completed", "6", timeout=15_000)

            # A repeat: its last run is "never", then one run by hand.
            repeat = page.locator("#repeat-rows tr[data-repeat='reports:nightly']")
            await expect(repeat.locator("[data-last-run]")).to_have_text("never")
            await in_reach(repeat.locator("[data-action=repeat-run]"))
            await repeat.locator("[data-action=repeat-run]").click()
            await expect(page.locator("#notice")).to_contain_text("added, now")
            await expect(repeat.locator("[data-last-run]")).to_contain_text("run by hand",
                                                                           timeout=15_000)
            await repeat.locator("[data-action=repeat-pause]").click()
            await expect(repeat.locator("[data-next-run]")).to_have_text("paused")
            [listed] = await daemon.operations.repeats("reports")
            assert listed["paused"] is True
            assert problems == []
        except BaseException:
            await page.screenshot(path=str(ARTIFACTS / "dashboard-800-failure.png"),
                                  full_page=True)
            raise
        finally:
            await context.close()

        # A viewer sees the same and is offered nothing to change.
        context, page, problems = await log_in(browser, url, VIEWER)
        try:
            await expect(page.locator("#read-only")).to_be_visible()
            await expect(page.locator("#actor")).to_have_text("token:wall")
            # 3 + 3 retried + the repeat's run by hand.
            await expect(page.locator("[data-throughput=reports]")).to_have_attribute(
                "data-completed", "7", timeout=15_000)
            await page.locator("#queue-rows tr[data-queue='reports'] [data-count='completed']"
                               ).click()
            await expect(page.locator("#run-rows tr[data-run-id]")).to_have_count(7)
            repeat = page.locator("#repeat-rows tr[data-repeat='reports:nightly']")
            await expect(repeat).to_contain_text("paused")
            await page.locator("#run-rows [data-action=details]").first.click()
            await expect(page.locator("#detail-section")).to_be_visible()
            visible = await page.locator("[data-write]").evaluate_all(
                "es => es.filter(e => e.offsetParent !== null).map(e => e.outerHTML)")
            assert visible == []
            for name in ("Pause", "Resume", "Retry", "Remove", "Promote", "Run now", "Clean"):
                await expect(page.get_by_role("button", name=name, exact=True)).to_have_count(0)
            # And the API refuses the viewer's session even if asked directly.
            status = await page.evaluate("""async () => {
                const s = await (await fetch('/admin/session')).json();
                const r = await fetch('/api/v1/queues/reports/pause', {method: 'POST',
                    headers: {'X-CSRF-Token': s.data.csrfToken}});
                return [r.status, (await r.json()).error.code];
            }""")
            assert status == [403, "auth/forbidden"]
            assert (await daemon.operations.stats())["reports"]["isPaused"] is False
            await page.screenshot(path=str(ARTIFACTS / "dashboard-viewer.png"), full_page=True)
            assert problems == []
        except BaseException:
            await page.screenshot(path=str(ARTIFACTS / "dashboard-viewer-failure.png"),
                                  full_page=True)
            raise
        finally:
            await context.close()
            await browser.close()
