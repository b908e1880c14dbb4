"""The edge layer: per-IP fixed windows by Flask-Limiter, on the same store and connections."""

from __future__ import annotations

import math
import time
from typing import Any

from flask import Flask, Response, jsonify
from flask_limiter import Limiter
from flask_limiter.errors import RateLimitExceeded
from limits.errors import StorageError

from .errors import LimiterUnavailable
from .identity import client_ip
from .policy import Policy
from .store import Store, edge_storage


def init_edge(app: Flask, policy: Policy, store: Store) -> Limiter | None:
    """Register Flask-Limiter with the policy's [edge] per_ip limits; None when there are none."""
    if not policy.edge_per_ip:
        return None
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

    @app.errorhandler(RateLimitExceeded)
    def edge_refused(exc: RateLimitExceeded) -> Any:
        return edge_response(edge, exc)

    @app.errorhandler(StorageError)
    def edge_store_away(exc: StorageError) -> Any:
        err = LimiterUnavailable()
        response = jsonify(err.body())
        response.status_code = 503
        response.headers["Retry-After"] = str(err.retry_after)
        return response

    return edge


def edge_response(edge: Limiter, exc: RateLimitExceeded) -> Response:
    """429 JSON for an edge refusal; the wait is the fixed window's remaining time."""
    current = edge.current_limit
    limit = exc.limit.limit
    reset_at = current.reset_at if current is not None else time.time() + limit.get_expiry()
    retry_after = max(1, math.ceil(reset_at - time.time()))
    response = jsonify({
        "error": f"Too many requests from this address ({limit}); retry after {retry_after}s.",
        "code": "rate_limited",
        "layer": "edge",
        "retry_after": retry_after,
    })
    response.status_code = 429
    response.headers.update({
        "Retry-After": str(retry_after),
        "RateLimit-Policy": f'"edge";q={limit.amount};w={limit.get_expiry()}',
        "RateLimit": f'"edge";r=0;t={retry_after}',
        "X-RateLimit-Limit": str(limit.amount),
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": str(retry_after),
    })
    return response
