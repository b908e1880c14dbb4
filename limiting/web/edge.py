"""The edge layer: per-IP fixed windows by Flask-Limiter, on the same store and connections."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from flask import Flask, Response
from flask_limiter import Limiter
from flask_limiter.errors import RateLimitExceeded
from limits.errors import StorageError

from ..core.policy import Policy
from ..stores.store import Store, edge_storage
from . import logs
from .context import LIMITED_ROUTE, request_limits
from .errors import LimiterUnavailable, json_response
from .flask_limiter_adapter import RequestHooks, take_request_hooks
from .identity import client_ip
from .recording import refused_by

# Flask-Limiter's after-request hook, for the extension's own after_request to call.
AfterHook = Callable[[Response], Response]


def mark_limited(view: Any) -> Any:
    """Mark a view that calls acquire() (payer.plan): its edge check rides in that same
    script call."""
    setattr(view, LIMITED_ROUTE, True)
    return view


def is_limited_route() -> bool:
    return request_limits().is_limited_route()


def combines_edge(store: Store) -> bool:
    return store.single_node


def init_edge(app: Flask, policy: Policy, store: Store
              ) -> tuple[Limiter | None, RequestHooks | None]:
    """Register Flask-Limiter with the policy's [edge] per_ip limits; None when there are none.

    On one Redis server, limited routes count the edge inside their acquire call, on
    Flask-Limiter's own keys; every other route (and every route on a Cluster or memory://)
    is checked by Flask-Limiter before the view, as usual. The hooks returned are
    Flask-Limiter's, taken out of the app for the gate (limiting/web/gate.py) to run on the
    routes that need them (None: Flask-Limiter runs its own).
    """
    if not policy.edge_per_ip:
        return None, None
    uri, options = edge_storage(store)
    if policy.fail_edge == "fail_closed":
        options = {**options, "wrap_exceptions": True}
    edge = Limiter(
        client_ip,
        application_limits=list(policy.edge_per_ip),  # one budget per IP across routes
        storage_uri=uri,
        storage_options=options,
        strategy="fixed-window",
        headers_enabled=False,   # our after_request writes one coherent set of headers
        swallow_errors=policy.fail_edge == "fail_open",
        key_prefix="edge",
    )
    edge.init_app(app)
    hooks = _skip_limited_routes(app, edge) if combines_edge(store) else None

    @app.errorhandler(RateLimitExceeded)
    def edge_refused(exc: RateLimitExceeded) -> Any:
        return edge_response(edge, exc)

    @app.errorhandler(StorageError)
    def edge_store_away(exc: StorageError) -> Any:
        err = LimiterUnavailable()
        return json_response(503, err.body(), retry_after=err.retry_after)

    return edge, hooks


def _skip_limited_routes(app: Flask, edge: Limiter) -> RequestHooks | None:
    """Keep Flask-Limiter's hooks off the routes whose acquire call counts the edge.

    A request filter would do the same, but only after Flask-Limiter has resolved and evaluated
    its limits for the request: on the hot path that costs as much as our script. Its
    after_request and teardown hooks have nothing to do there either (no limit of its own was
    looked at). The same holds on routes RateLimiter.exempt marked (EDGE_EXEMPT). So its three
    hooks are taken out (flask_limiter_adapter) and returned: the gate runs the check in its own
    before_request hook and the after-request hook in its own after_request (one Flask hook of
    each instead of two on every request); the teardown runs here, on every other route.
    """
    hooks = take_request_hooks(app, edge)
    if hooks is None:  # a Flask-Limiter that registers differently: filter instead
        edge.request_filter(is_limited_route)
        return None

    @app.teardown_request
    def edge_teardown(exc: BaseException | None) -> None:
        if not request_limits().edge_hooks_idle():
            hooks.teardown(exc)

    return hooks


def edge_response(edge: Limiter, exc: RateLimitExceeded) -> Response:
    """429 JSON for an edge refusal; the wait is the fixed window's remaining time."""
    current = edge.current_limit
    limit = exc.limit.limit
    reset_at = current.reset_at if current is not None else time.time() + limit.get_expiry()
    retry_after = max(1, math.ceil(reset_at - time.time()))
    logs.request_id()
    refused_by("ip", client_ip(), "edge", retry_after)
    return json_response(429, {
        "error": f"Too many requests from this address ({limit}); retry after {retry_after}s.",
        "code": "rate_limited",
        "layer": "edge",
        "retry_after": retry_after,
    }, {
        "RateLimit-Policy": f'"edge";q={limit.amount};w={limit.get_expiry()}',
        "RateLimit": f'"edge";r=0;t={retry_after}',
        "X-RateLimit-Limit": str(limit.amount),
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": str(retry_after),
    }, retry_after)
