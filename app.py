"""The app: create_app() for tests and embedding; ``app`` for gunicorn and ``flask --app app``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from flask import Flask

from blueprints import health_bp, register_blueprints, usage
from limiting import RateLimiter
from limiting import logs as limiter_logs

MAX_BODY_BYTES = 1024 * 1024


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    app = Flask(__name__, instance_path=os.environ.get("LIMITER_INSTANCE") or None)
    app.config.update(
        MAX_CONTENT_LENGTH=MAX_BODY_BYTES,
        DEFAULT_MODEL=os.environ.get("DEFAULT_MODEL", "echo"),
    )
    app.config.update(config or {})
    limiter_logs.configure()
    limiter = RateLimiter(app)
    register_blueprints(app)
    limiter.exempt(health_bp)
    limiter.exempt(usage.usage_page)   # an operator's page refreshes itself
    limiter.exempt(usage.usage_json)
    return app


def __getattr__(name: str) -> Flask:
    # Built on first use, so `from app import create_app` starts nothing.
    if name == "app":
        globals()["app"] = created = create_app()
        return created
    raise AttributeError(name)
