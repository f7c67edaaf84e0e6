"""The console in a real browser (Debian's chromium driven by Playwright), against
``pubrelay serve --console`` as ``make run`` starts it: log in with the generated token,
search by voucher code, open the timeline, replay a dead letter and watch it turn done,
read the e-mail the ``email`` handler wrote to the outbox, view the quarantine.

Screenshots of each page are kept in the test's tmp dir (and copied to
``$CONSOLE_SCREENSHOTS_DIR`` when set: that is how docs/img/ is refreshed).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
from pathlib import Path

import aiohttp
import pytest
from playwright.async_api import Page, async_playwright

from consumer.signature import sign
from tests.fixtures.app import event_body
from tests.fixtures.fake_receiver import SECRET as FORWARD_SECRET
from tests.fixtures.fake_receiver import FakeReceiver
from tests.fixtures.process import Launcher

CHROMIUM = Path("/usr/bin/chromium")
WEBHOOK_SECRET = "browser-test-webhook-secret"
CODE = "SPRING-BROWSER-42"


def keep(path: Path) -> None:
    """Copy a screenshot to ``$CONSOLE_SCREENSHOTS_DIR`` when it is set."""
    if target := os.environ.get("CONSOLE_SCREENSHOTS_DIR"):
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / path.name)


async def shot(page: Page, folder: Path, name: str) -> None:
    path = folder / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    keep(path)


@pytest.fixture
def chromium() -> str:
    assert CHROMIUM.exists(), "install Debian's chromium (make system-deps)"
    return str(CHROMIUM)


async def test_an_operator_finds_a_code_and_replays_its_dead_letter_in_a_browser(
    tmp_path: Path, run_pubrelay: Launcher, fake_receiver: FakeReceiver, chromium: str
) -> None:
    process = run_pubrelay(
        ["serve", "--console"],
        env={
            "PUBRELAY_WEBHOOK__SECRETS": json.dumps([WEBHOOK_SECRET]),
            "PUBRELAY_HANDLERS__ENABLED": '["http", "email"]',
            "PUBRELAY_EMAIL__SMTP_URL": "outbox:",
            "PUBRELAY_EMAIL__SENDER": "Spring Shop <shop@example.com>",
            "PUBRELAY_FORWARD__URL": fake_receiver.url,
            "PUBRELAY_FORWARD__SECRET": FORWARD_SECRET,
            "PUBRELAY_LOG__FORMAT": "console",
        },
    )
    await asyncio.to_thread(process.wait_ready)
    token_file = tmp_path / "var" / "console-token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert f"127.0.0.1:{process.port}/console/" in process.output()
    token = token_file.read_text().strip()

    fake_receiver.fail_next(1, 400, body="unknown customer <script>alert(1)</script>")
    envelope = json.loads(event_body(event_id="evt_browser_1", customer_id="cust_browser"))
    envelope["data"]["publication"]["voucher"]["code"] = CODE
    body = json.dumps(envelope).encode()
    async with aiohttp.ClientSession() as http:
        answer = await http.post(
            f"{process.url}/webhooks/voucherify",
            data=body,
            headers={"x-voucherify-signature": sign(WEBHOOK_SECRET, body)},
        )
        assert answer.status == 202
        hostile = b'<script>alert("quarantined")</script> not JSON'
        answer = await http.post(
            f"{process.url}/webhooks/voucherify",
            data=hostile,
            headers={"x-voucherify-signature": sign(WEBHOOK_SECRET, hostile)},
        )
        assert (await answer.json())["status"] == "quarantined"

    shots = tmp_path / "screenshots"
    shots.mkdir()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(10_000)
            await page.goto(f"{process.url}/console/")
            assert "/console/login" in page.url  # no token, no console
            await page.fill("#token", token)
            await page.click("button[type=submit]")
            await page.wait_for_url(f"{process.url}/console/")
            await page.get_by_role("heading", name="Overview").wait_for()

            await page.fill("input[name=q]", CODE.lower())
            await page.press("input[name=q]", "Enter")
            await page.get_by_role("link", name="evt_browser_1").wait_for()
            await shot(page, shots, "console-search")
            await page.get_by_role("link", name="evt_browser_1").click()
            await page.get_by_text("dead lettered").first.wait_for()  # the index lags a little
            await shot(page, shots, "console-timeline-dead-lettered")
            assert await page.locator("script").count() == 0  # the error text stayed text

            await page.click("text=Dead letters")
            await page.get_by_text("1 waiting for replay").wait_for()
            await shot(page, shots, "console-dead-letters")
            await page.get_by_role("link", name="Replay…").click()
            await page.get_by_text("Dry run: nothing was sent").wait_for()
            await shot(page, shots, "console-replay-preview")
            await page.get_by_role("button", name="Replay 1 dead letter").click()
            await page.get_by_role("status").wait_for()

            await page.goto(f"{process.url}/console/events/evt_browser_1")
            http_done = page.locator('li.attempt:has(strong:text-is("http")) .badge.done')
            for _ in range(50):  # the worker takes it from the retry topic: bounded wait
                if await http_done.count():
                    break
                await asyncio.sleep(0.2)
                await page.reload()
            await http_done.wait_for()
            await page.get_by_text("e-mail (outbox)").wait_for()  # the e-mail it wrote
            await shot(page, shots, "console-timeline")
            assert fake_receiver.event_ids == ["evt_browser_1"]

            await page.goto(f"{process.url}/console/outbox")  # the e-mail, never sent
            await page.locator("table a").first.click()
            frame = page.frame_locator("iframe.mail")
            await frame.get_by_text(CODE).first.wait_for()
            assert CODE in await page.locator("pre.body").inner_text()  # the text part
            await shot(page, shots, "console-outbox-mail")

            await page.goto(f"{process.url}/console/quarantine")
            await page.click("summary")
            await page.get_by_text('alert("quarantined")').wait_for()
            assert await page.locator("script").count() == 0
            await shot(page, shots, "console-quarantine")

            await page.goto(f"{process.url}/console/")
            await shot(page, shots, "console-overview")
        finally:
            await browser.close()
    assert process.terminate() == 0
