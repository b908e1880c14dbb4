"""The one place that knows how Flask-Limiter hooks itself into a Flask app.

On limited routes the edge is counted inside our own script call, so Flask-Limiter's three
request hooks have nothing to do there. Its public ways out (``request_filter``, ``exempt``)
are asked only after it has resolved the request's limits, which on the hot path costs about
as much as our whole decision; so we take its hooks out of the app and run them ourselves,
on the other routes only. Nothing public says where they are: this module relies on
Flask-Limiter's ``init_app`` registering exactly
``before_request(limiter._check_request_limit)``, ``after_request(partial(Limiter.<headers>,
limiter))`` and ``teardown_request(<bound method of limiter>)``. tests/test_adapters.py
fails, naming the pinned version, the day that stops being true.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from flask import Flask
from flask_limiter import Limiter

# The Flask-Limiter this adapter was written against (requirements.txt pins it).
PINNED = "4.1.1"


@dataclass(frozen=True)
class RequestHooks:
    """Flask-Limiter's per-request work, as three plain callables."""

    check: Callable[[], Any]             # before the view: evaluate (and count) its limits
    after: Callable[[Any], Any]          # on the response: deductions, headers
    teardown: Callable[[Any], Any]       # forget the request's limiter context


def take_request_hooks(app: Flask, limiter: Limiter) -> RequestHooks | None:
    """Remove ``limiter``'s request hooks from ``app`` and return them, or None (and change
    nothing) when they are not all where this adapter expects them."""
    before = app.before_request_funcs.get(None, [])
    after = app.after_request_funcs.get(None, [])
    teardown = app.teardown_request_funcs.get(None, [])
    check = limiter._check_request_limit
    found_after = [h for h in after if _belongs_to(h, limiter)]
    found_teardown = [h for h in teardown if _belongs_to(h, limiter)]
    if check not in before or len(found_after) != 1 or len(found_teardown) != 1:
        return None
    before.remove(check)
    after.remove(found_after[0])
    teardown.remove(found_teardown[0])
    return RequestHooks(check, found_after[0], found_teardown[0])


def _belongs_to(hook: Any, limiter: Limiter) -> bool:
    if isinstance(hook, partial):
        return any(arg is limiter for arg in hook.args)
    return getattr(hook, "__self__", None) is limiter
