"""The app: create_app() for tests and embedding; ``app`` for gunicorn and ``flask --app app``."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from flask import Flask

from blueprints import register
from limiting import RateLimiter
from limiting.blueprints import usage
from limiting.web import logs as limiter_logs
from limiting.web.body import BodyDeadline

MAX_BODY_BYTES = 1024 * 1024
MIN_ADMIN_TOKEN = 32


class App(Flask):
    """Flask, asking once per view or hook whether it is a coroutine function: Flask asks
    on every call (~1 µs each, five a request), and ensure_sync is its override point."""

    _SYNC_CACHE_SIZE = 1024   # per-request callables (after_this_request) stay uncached

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sync_cache: dict[Any, Callable[..., Any]] = {}

    def ensure_sync(self, func: Callable[..., Any]) -> Callable[..., Any]:
        cache = self._sync_cache
        found = cache.get(func)
        if found is None:
            found = super().ensure_sync(func)
            if len(cache) < self._SYNC_CACHE_SIZE:
                cache[func] = found
        return found


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    app = App(__name__, instance_path=os.environ.get("LIMITER_INSTANCE") or None)
    app.config.update(
        MAX_CONTENT_LENGTH=MAX_BODY_BYTES,
        DEFAULT_MODEL=os.environ.get("DEFAULT_MODEL", "echo"),
        BODY_TIMEOUT=float(os.environ.get("BODY_TIMEOUT") or 10),
    )
    app.config.update(config or {})
    _check_admin_token(app)
    limiter_logs.configure()
    app.config["REQUIRE_API_KEY"] = _require_api_key(app.config.get("REQUIRE_API_KEY"))
    limiter = RateLimiter(app)
    register(app, limiter)
    # Outermost: a body is whole (or refused) before ProxyFix, the edge or any view runs.
    app.wsgi_app = BodyDeadline(  # type: ignore[method-assign]
        app.wsgi_app, timeout=float(app.config["BODY_TIMEOUT"]),
        max_bytes=int(app.config["MAX_CONTENT_LENGTH"]))
    return app


def _require_api_key(configured: object) -> bool:
    """/chat needs an API key once a provider key is set: paid calls are never anonymous.

    ``REQUIRE_API_KEY`` (config or environment) decides explicitly; the choice is logged at
    start, since an anonymous /chat in front of a paid provider is a choice worth seeing.
    """
    raw = configured if configured is not None else os.environ.get("REQUIRE_API_KEY")
    paid = bool(os.environ.get("OPENAI_API_KEY") or os.environ.get("ANTHROPIC_API_KEY"))
    if raw is None or str(raw).strip() == "":
        required, why = paid, ("a provider key is set" if paid else
                               "no provider key is set: /chat serves echo")
    else:
        required = str(raw).strip().lower() in ("1", "true", "yes", "on")
        why = "REQUIRE_API_KEY set explicitly"
    level = logging.WARNING if paid and not required else logging.INFO
    logging.getLogger("limiter.app").log(
        level, "/chat %s (%s)", "needs an API key" if required else
        "takes user_id from the body: anonymous callers may spend provider calls"
        if paid else "takes user_id from the body", why)
    return required


def _check_admin_token(app: Flask) -> None:
    """A short ADMIN_TOKEN fails the start (gunicorn does not boot), not the first guess."""
    token = usage.admin_token(app)
    if token and len(token) < MIN_ADMIN_TOKEN:
        raise RuntimeError(
            f"ADMIN_TOKEN must be at least {MIN_ADMIN_TOKEN} characters (it has {len(token)}); "
            "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'")


def __getattr__(name: str) -> Flask:
    # Built on first use, so `from app import create_app` starts nothing.
    if name == "app":
        globals()["app"] = created = create_app()
        return created
    raise AttributeError(name)
