"""The operator's usage page in a real headless Chromium: it loads, its bars move after
traffic, and it keeps a screenshot. Plus GET /v1/usage and the admin credential."""

from __future__ import annotations

import os
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


def admin_page(pw: Any, height: int) -> tuple[Any, Any]:
    """Debian's chromium, headless, and a page that presents the admin credential."""
    browser = pw.chromium.launch(
        executable_path=CHROMIUM, headless=True,
        args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update",
              "--disable-sync"])
    page = browser.new_context(http_credentials={"username": "admin", "password": ADMIN},
                               viewport={"width": 1100, "height": height}).new_page()
    return browser, page


def test_usage_page_in_headless_chromium(app, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Debian's chromium is needed: apt-get install chromium"
    with sync_playwright() as pw:
        browser, page = admin_page(pw, 700)
        try:
            page.goto(app.url + "/admin/usage?users=page-user", timeout=20_000)
            bar = page.locator('section[data-name="page-user"] div[data-layer="user"] .fill')
            bar.wait_for(timeout=10_000)
            assert bar.get_attribute("data-remaining") == "20"
            assert page.locator('section[data-name="gpt-4o"]').count() == 1
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
