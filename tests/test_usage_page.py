"""The operator's usage page in a real headless Chromium: it loads, its bars move after
traffic, and it keeps a screenshot. Plus GET /v1/usage and the admin credential."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import ROOT, write_policy
from tests.policies import LOADED, plan, policy, served_by
from tests.usage_page_state import CLAUDE, GPT, HOSTILE, realistic

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ADMIN = "admin-secret-of-at-least-32-characters"
POLICY = policy(store=LOADED, per_ip="10000 per minute", users={"page-user": "p"},
                plans={"p": plan(20, 0.01, "100 per day", tokens_per_minute=50000)},
                models={"gpt-4o": served_by("openai", requests_per_minute=500)})


@pytest.fixture
def app(gunicorn, tmp_path: Path, r: redis.Redis, unix_url: str):
    return gunicorn(REDIS_URL=unix_url, LIMITS_CONFIG=write_policy(tmp_path, POLICY),
                    ADMIN_TOKEN=ADMIN, WEB_CONCURRENCY="2")


def test_admin_credential_is_required(app) -> None:
    assert httpx.get(app.url + "/admin/usage").status_code == 401
    assert httpx.get(app.url + "/admin/usage.json", auth=("admin", "wrong")).status_code == 401
    ok = httpx.get(app.url + "/admin/usage.json", auth=("admin", ADMIN))
    assert ok.status_code == 200 and ok.json()["users"][0]["user"] == "page-user"
    bearer = {"Authorization": f"Bearer {ADMIN}"}
    assert httpx.get(app.url + "/admin/usage.json", headers=bearer).status_code == 200


def test_v1_usage_is_the_callers_own(app, tmp_path: Path, unix_url: str) -> None:
    env = {"PATH": "/usr/bin:/bin", "REDIS_URL": unix_url,
           "LIMITS_CONFIG": write_policy(tmp_path, POLICY)}
    out = subprocess.run([sys.executable, "-m", "flask", "--app", "app", "keys", "create",
                          "page-user", "--plan", "p"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    key = out.strip().splitlines()[-1]
    assert httpx.get(app.url + "/v1/usage").status_code == 401
    body = httpx.get(app.url + "/v1/usage", headers={"Authorization": f"Bearer {key}"}).json()
    assert body["user"] == "page-user" and body["plan"] == "p"
    assert {layer["layer"] for layer in body["layers"]} >= {"user", "quota-day", "tokens-minute"}


def admin_page(pw: Any, height: int, width: int = 1100, dark: bool = False) -> tuple[Any, Any]:
    """Debian's chromium, headless, and a page that presents the admin credential (``dark``:
    as a browser that prefers a dark colour scheme)."""
    browser = pw.chromium.launch(
        executable_path=CHROMIUM, headless=True,
        args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update",
              "--disable-sync"])
    page = browser.new_context(http_credentials={"username": "admin", "password": ADMIN},
                               viewport={"width": width, "height": height},
                               color_scheme="dark" if dark else "light").new_page()
    return browser, page


def test_usage_page_in_headless_chromium(app, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Debian's chromium is needed: apt-get install chromium"
    with sync_playwright() as pw:
        browser, page = admin_page(pw, 700)
        try:
            page.goto(app.url + "/admin/usage?users=page-user", timeout=20_000)
            bar = page.locator('tr.user[data-user="page-user"] [data-layer="user"] .fill')
            bar.wait_for(timeout=10_000)
            assert bar.get_attribute("data-remaining") == "20"
            assert page.locator('div.guard[data-model="gpt-4o"]').count() == 1
            # Empty states say what would appear; nothing refused, nobody near, no spend.
            assert "would be listed here" in page.locator("#near-body").inner_text()
            assert "No refusals since the server started" in page.locator(
                "#refusals-body").inner_text()
            assert "Nobody has spent anything today" in page.locator("#spenders").inner_text()
            assert page.locator("#daily figure p.empty").count() == 2
            for _ in range(5):
                httpx.post(app.url + "/chat", json={"message": "hi", "user_id": "page-user"})
            deadline = time.monotonic() + 30    # a loaded box's bound: the page polls
            while bar.get_attribute("data-remaining") != "15":
                assert time.monotonic() < deadline, "the page did not refresh by itself"
                page.wait_for_timeout(200)
            width = bar.evaluate("el => el.style.width")
            assert float(width.rstrip("%")) == 75.0
            shot = Path(os.environ.get("USAGE_SCREENSHOT") or tmp_path / "usage-page.png")
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 5_000
        finally:
            browser.close()


RESETS_IN_SECONDS = re.compile(r"\b\d{3,}\s?s\b|reset \d+s")
SHOTS = [(1280, False), (1280, True), (390, False), (390, True)]


def test_realistic_usage_page(gunicorn, tmp_path: Path, r: redis.Redis, unix_url: str) -> None:
    """Keys, anonymous ids (one hostile), spend on two models, refusals: the page's four
    questions answered in words, one row per user, charts with titles and axes; screenshots
    at 1280 and 390 px, light and dark (USAGE_SCREENSHOTS=docs keeps them in docs/)."""
    from playwright.sync_api import sync_playwright

    with realistic(gunicorn, tmp_path, unix_url) as state:
        # Refusals by layer, summed over both workers, as the clients saw them (a worker
        # writes its counts at most a second apart).
        deadline = time.monotonic() + 30
        while True:
            data = httpx.get(state.url + "/admin/usage.json", auth=("admin", ADMIN)).json()
            if data["refusals"] == state.refused or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert data["refusals"] == state.refused and state.refused["quota-day"] == 3
        # One row per user and namespace, the realm in words; today's anonymous spenders too.
        pairs = [(u["user"], u["realm"]) for u in data["users"]]
        assert len(pairs) == len(set(pairs)), pairs
        assert ("bob", "key") in pairs and ("guest-7f3a", "anonymous") in pairs
        assert {m["model"]: m["pacing"]["requests_left"] is not None
                for m in data["models"]} == {GPT: True, CLAUDE: True}
        folder = Path(os.environ.get("USAGE_SCREENSHOTS") or tmp_path)
        with sync_playwright() as pw:
            for width, dark in SHOTS:
                browser, page = admin_page(pw, 900, width, dark)
                try:
                    errors: list[str] = []
                    page.on("pageerror", lambda exc, seen=errors: seen.append(str(exc)))
                    page.goto(state.url + "/admin/usage", timeout=20_000)
                    page.wait_for_function("!document.getElementById('stamp')"
                                           ".textContent.startsWith('loading')",
                                           timeout=15_000)
                    stamp = page.locator("#stamp").inner_text()
                    assert stamp.startswith("updated"), stamp
                    assert not errors, errors
                    page.locator("#refusals-body tr.refusing").first.wait_for(timeout=15_000)
                    page.locator('#spenders tr.spender[data-user="alice"]').click()
                    page.locator("#user-detail svg.daily").first.wait_for(timeout=10_000)
                    name = f"usage-page-{width}-{'dark' if dark else 'light'}.png"
                    page.screenshot(path=str(folder / name), full_page=True)
                    assert (folder / name).stat().st_size > 20_000
                    check_page(page)
                finally:
                    browser.close()


def check_page(page: Any) -> None:
    """What the operator reads: words, not raw seconds or realm codes; one row per user."""
    text = page.locator("body").inner_text()
    assert not RESETS_IN_SECONDS.search(text), RESETS_IN_SECONDS.search(text)
    assert "b:" not in text and "u:" not in text
    # bob's day quota: hours away (the page drops " 0 min": a reset within a minute past the
    # hour reads "23 h", seen once on a run that reached it then)
    assert re.search(r"(frees|full again) in \d+ h( \d+ min)?\b", text)
    assert re.search(r"\$\d+\.\d{2}", text) and re.search(r"\d,\d{3}", text)
    # The hostile id is text on the page, never markup.
    assert HOSTILE in text and page.title() == "Rate limits — usage"
    # At or near a limit: bob is out of his day's quota; kiosk-12 of its bucket.
    near = page.locator("#near-body tr.near")
    assert near.first.get_attribute("data-user") in {"bob", "kiosk-12"}
    assert page.locator('#near-body tr.near[data-user="bob"][data-layer="quota-day"]').count() == 1
    # One row per user (and namespace) in each table.
    for rows in ("#users tr.user", "#spenders tr.spender"):
        seen = [(page.locator(rows).nth(i).get_attribute("data-user"),
                 page.locator(rows).nth(i).get_attribute("data-realm"))
                for i in range(page.locator(rows).count())]
        assert len(seen) == len(set(seen)) and ("alice", "key") in seen, seen
        assert ("guest-7f3a", "anonymous") in seen
    # Every chart has a title and an axis with labels.
    charts = page.locator("svg.daily")
    assert charts.count() >= 2
    for i in range(charts.count()):
        chart = charts.nth(i)
        assert chart.locator("title").first.text_content()
        assert chart.locator("line.axis").count() == 3 and chart.locator("text").count() >= 4
    assert page.locator("#daily svg[data-key=usd_micros] rect.v[height]").count() == 30
    assert page.locator("svg.spark title").count() == page.locator("svg.spark").count()
    # The guards: both models, pacing in words.
    for model in (GPT, CLAUDE):
        guard = page.locator(f'div.guard[data-model="{model}"]')
        assert "Pacing holds: the provider said" in guard.inner_text()
    refusing = page.locator('#refusals-body tr.refusing[data-layer="quota-day"]')
    assert "6 requests per day" in refusing.inner_text()
