"""Adopting the library in another Flask app: the README's ten lines, as they are."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import redis
from flask import Blueprint, Flask, request

from limiting import RateLimiter, plan
from tests.conftest import ROOT, write_policy
from tests.policies import loaded_toml

# A loaded box's store budget (tests/README.md, rule 6): at 50 ms a missed budget passes the
# fourth call through the bucket's fail_open.
POLICY = (loaded_toml() +
          "[plans.free]\nburst = 3\nrefill_per_second = 0.01\nquotas = ['100 per day']\n")


def test_decorating_your_own_routes(tmp_path: Path, r: redis.Redis, redis_url: str) -> None:
    app = Flask("someone_elses_app")
    app.config.update(LIMITS_CONFIG=write_policy(tmp_path, POLICY), REDIS_URL=redis_url)
    limiter = RateLimiter(app)

    @app.post("/summarise")
    @limiter.plan(user=lambda: request.headers["X-User-Id"])
    def summarise() -> dict[str, bool]:
        return {"ok": True}

    bp = Blueprint("reusable", __name__)

    @bp.get("/report")
    @plan(user=lambda: request.args["user"])
    def report() -> dict[str, bool]:
        return {"ok": True}

    app.register_blueprint(bp)
    client = app.test_client()
    codes = [client.post("/summarise", headers={"X-User-Id": "ann"}).status_code
             for _ in range(5)]
    assert codes == [200, 200, 200, 429, 429]
    refused = client.post("/summarise", headers={"X-User-Id": "ann"})
    assert refused.get_json()["layer"] == "user" and int(refused.headers["Retry-After"]) >= 1
    ok = client.get("/report?user=bob")
    assert ok.status_code == 200 and ok.headers["X-RateLimit-Remaining"] == "2"
    assert app.extensions["llm_limiter"] is limiter


def test_creating_the_app_does_not_import_the_provider_sdks(redis_url: str) -> None:
    # `flask limits ...` and `flask keys ...` build the app; the SDKs take ~1 s to import and
    # load only where a call is made (or in each gunicorn worker when a key is set).
    code = ("import sys; from app import create_app; create_app(); "
            "print(sorted(m for m in ('openai', 'anthropic') if m in sys.modules))")
    env = {**os.environ, "REDIS_URL": redis_url, "OPENAI_API_KEY": "sk-test"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
