"""Adopting the library in another Flask app: the README's ten lines, as they are."""

from __future__ import annotations

from pathlib import Path

import redis
from flask import Blueprint, Flask, request

from limiting import RateLimiter, limited
from tests.conftest import write_policy

POLICY = "[plans.free]\nburst = 3\nrefill_per_second = 0.01\nquotas = ['100 per day']\n"


def test_decorating_your_own_routes(tmp_path: Path, r: redis.Redis, redis_url: str) -> None:
    app = Flask("someone_elses_app")
    app.config.update(LIMITS_CONFIG=write_policy(tmp_path, POLICY), REDIS_URL=redis_url)
    limiter = RateLimiter(app)

    @app.post("/summarise")
    @limiter.limit(user=lambda: request.headers["X-User-Id"])
    def summarise() -> dict[str, bool]:
        return {"ok": True}

    bp = Blueprint("reusable", __name__)

    @bp.get("/report")
    @limited(user=lambda: request.args["user"])
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
