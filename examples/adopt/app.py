"""A plain Flask app adopting the limiter: the library's /chat blueprint as it is, and routes
of its own with limits where the routes are.

    gunicorn -c python:limiting.gunicorn examples.adopt.app:app

The policy is limits.toml beside this file (an app's root folder), found with no setting;
limiting.gunicorn checks it in the master, reloads it on HUP, and starts one Valkey every
worker shares when REDIS_URL is unset.
"""

from __future__ import annotations

from flask import Flask, request

from limiting import RateLimiter
from limiting.blueprints import chat_bp

app = Flask(__name__)
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


@app.post("/ask")
@limiter.plan(user=team)             # who pays: the team's plan (bucket, quotas, LLM units)
def ask() -> dict[str, str]:
    return {"answer": f"for {team()}"}


@app.get("/healthz")
@limiter.exempt
def healthz() -> dict[str, str]:
    return {"status": "ok"}
