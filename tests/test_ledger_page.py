"""The spend part of /admin/usage in a real headless Chromium: after traffic the top
spenders' numbers match /admin/spend's JSON, the daily chart and the sparklines render, and
clicking a spender shows their layers and history. Keeps a screenshot (SPEND_SCREENSHOT)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx

from tests.test_usage_page import ADMIN, admin_page
from tests.test_usage_page import app as app  # the same server, policy and admin token


def test_spend_on_the_usage_page(app, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    for user, count in (("page-user", 5), ("other-user", 2)):
        for _ in range(count):
            ok = httpx.post(app.url + "/chat", json={"message": "hello there " * 5,
                                                     "user_id": user})
            assert ok.status_code == 200
    spend = httpx.get(app.url + "/admin/spend?by=tok", auth=("admin", ADMIN)).json()
    want = {row["user"]: row["tokens"] for row in spend["top"]}
    assert set(want) == {"page-user", "other-user"}
    with sync_playwright() as pw:
        browser, page = admin_page(pw, 900)
        try:
            page.goto(app.url + "/admin/usage", timeout=20_000)
            rows = page.locator("#spenders tr.spender")
            rows.first.wait_for(timeout=10_000)
            seen = {rows.nth(i).get_attribute("data-user"):
                    int(rows.nth(i).get_attribute("data-tokens") or -1)
                    for i in range(rows.count())}
            assert seen == want
            # One row per spender; the day charts: dollars and tokens, 30 bars each.
            assert rows.count() == 2
            assert page.locator("#daily svg.daily rect.v").count() == 60
            last = page.locator("#daily svg[data-key=usd_micros] rect.v").last
            assert int(last.get_attribute("data-value") or -1) == spend["total"]["usd_micros"]
            assert page.locator("svg.spark polyline").count() >= 2

            # More traffic: the page follows by itself.
            httpx.post(app.url + "/chat", json={"message": "more", "user_id": "other-user"})
            other = page.locator('#spenders tr.spender[data-user="other-user"]')
            deadline = time.monotonic() + 30    # a loaded box's bound: the page polls
            while int(other.get_attribute("data-tokens") or 0) <= want["other-user"]:
                assert time.monotonic() < deadline, "the spend did not refresh by itself"
                page.wait_for_timeout(200)

            page.locator('#spenders tr.spender[data-user="page-user"]').click()
            detail = page.locator("#user-detail")
            detail.wait_for(timeout=10_000)
            assert detail.locator("svg.daily").count() == 2
            # Their layers are in the users' table once, not repeated in the detail.
            assert detail.locator("[data-layer]").count() == 0
            assert page.locator('#users tr.user[data-user="page-user"]').count() == 1
            shot = Path(os.environ.get("SPEND_SCREENSHOT") or tmp_path / "spend-page.png")
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 5_000
        finally:
            browser.close()
