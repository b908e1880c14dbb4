"""A plain Flask app adopting the limiter: the project's /chat blueprint as it is, and two
routes of its own with limits where the routes are.

    LIMITS_CONFIG=examples/adopt/limits.toml gunicorn -c gunicorn.conf.py examples.adopt.app:app

(from the repository root: gunicorn.conf.py checks the policy file LIMITS_CONFIG names, the
project's limits.toml when unset, and reloads it on HUP.)
"""

from __future__ import annotations

import os
from pathlib import Path

from flask import Flask, request

from limiting import RateLimiter
from limiting.blueprints import chat_bp

app = Flask(__name__)
app.config.update(
    LIMITS_CONFIG=os.environ.get("LIMITS_CONFIG") or str(Path(__file__).with_name("limits.toml")),
)   # REDIS_URL from the environment (gunicorn.conf.py starts a Valkey when it is unset)
limiter = RateLimiter(app)
app.register_blueprint(chat_bp)      # POST /chat: the user's plan, as in the project's app


def team() -> str:
    """Who a limit counts: the caller's team (your auth would say; a header here)."""
    return request.headers.get("X-Team", "anonymous")


@app.post("/summarise")
@limiter.token_bucket(burst=5, per_second=0.1, key=team)       # bursts of 5, then 1 per 10 s
def summarise() -> dict[str, str]:
    text = (request.get_json(silent=True) or {}).get("text", "")
    return {"summary": text[:40]}


@app.post("/report")
@limiter.sliding_window("30 per hour", key=team, cost=3)       # a report weighs 3 calls
@limiter.sliding_window("100 per day", key=team, scope="reports")   # shared with other routes
def report() -> dict[str, str]:
    return {"report": f"for {team()}"}


@app.get("/healthz")
@limiter.exempt
def healthz() -> dict[str, str]:
    return {"status": "ok"}
