"""What we rely on in Flask-Limiter's private parts, checked against the installed version.

limiting/web/flask_limiter_adapter.py takes Flask-Limiter's request hooks out of the app so
limited routes skip them. If a new Flask-Limiter registers them differently, these tests fail
and say which version the adapter was written for; the extension then falls back to a public
request_filter (correct, but slower), which the last test holds.
"""

from __future__ import annotations

import importlib.metadata

from flask import Flask
from flask_limiter import Limiter
from flask_limiter.errors import RateLimitExceeded

from limiting.web.flask_limiter_adapter import PINNED, take_request_hooks

INSTALLED = importlib.metadata.version("flask-limiter")
WHY = (f"flask-limiter {INSTALLED} is installed; limiting/web/flask_limiter_adapter.py was "
       f"written against {PINNED}: check what init_app registers and update the adapter")


def _app_with_limiter() -> tuple[Flask, Limiter]:
    app = Flask(__name__)
    limiter = Limiter(lambda: "127.0.0.1", application_limits=["2 per minute"],
                      storage_uri="memory://", headers_enabled=False)
    limiter.init_app(app)

    @app.get("/")
    def index() -> str:
        return "ok"

    return app, limiter


def test_pinned_version_is_installed() -> None:
    assert INSTALLED == PINNED, WHY


def test_the_three_hooks_are_found_and_taken_out() -> None:
    app, limiter = _app_with_limiter()
    hooks = take_request_hooks(app, limiter)
    assert hooks is not None, WHY
    assert not app.before_request_funcs.get(None), WHY
    assert not app.after_request_funcs.get(None), WHY
    assert not app.teardown_request_funcs.get(None), WHY


def test_taken_hooks_still_limit_when_run_by_hand() -> None:
    app, limiter = _app_with_limiter()
    hooks = take_request_hooks(app, limiter)
    assert hooks is not None, WHY
    app.before_request(hooks.check)
    app.after_request(hooks.after)
    app.teardown_request(hooks.teardown)
    refused = []

    @app.errorhandler(RateLimitExceeded)
    def on_refusal(exc: RateLimitExceeded) -> tuple[str, int]:
        refused.append(exc)
        return "slow down", 429

    client = app.test_client()
    assert [client.get("/").status_code for _ in range(3)] == [200, 200, 429], WHY
    assert len(refused) == 1


def test_unknown_layout_changes_nothing() -> None:
    app, limiter = _app_with_limiter()
    app.before_request_funcs[None].clear()   # as if a new version registered elsewhere
    after = list(app.after_request_funcs[None])
    assert take_request_hooks(app, limiter) is None
    assert app.after_request_funcs[None] == after
