"""GET /healthz and GET /metrics — exempt from the edge, so probes and scrapes never get 429."""

from __future__ import annotations

import hmac
import os

from flask import Blueprint, Response, current_app, request
from werkzeug.datastructures import WWWAuthenticate
from werkzeug.exceptions import TooManyRequests, Unauthorized

from limiting.keys import bearer_token
from limiting.metrics import render as render_metrics
from limiting.stores.store import StoreUnavailable
from limiting.web.extension import current_limiter
from limiting.web.identity import client_ip

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> tuple[dict[str, object], int]:
    ok = current_limiter().store.ping()
    body: dict[str, object] = {"status": "ok" if ok else "degraded",
                               "store": "ok" if ok else "unreachable",
                               "worker": os.getpid()}
    return body, 200 if ok else 503


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus exposition, summed over every gunicorn worker. With METRICS_TOKEN set, only
    for ``Authorization: Bearer <METRICS_TOKEN>`` (failures limited per IP, as the admin's)."""

    token = str(current_app.config.get("METRICS_TOKEN") or os.environ.get("METRICS_TOKEN", ""))
    if token:
        presented = bearer_token(request.headers.get("Authorization")) or ""
        ok = hmac.compare_digest(presented.encode(), token.encode())
        try:
            wait = current_limiter().auth_failures.attempt(client_ip(), ok)
        except StoreUnavailable:
            # A scrape must work during an outage, when metrics matter most; the token is
            # still required, only the count of failures waits for the store.
            wait = 0
        if wait:
            raise TooManyRequests("Too many failed credentials from this address; "
                                  "retry later.", retry_after=wait)
        if not ok:
            raise Unauthorized("Authorization: Bearer <METRICS_TOKEN> is required.",
                               www_authenticate=WWWAuthenticate("bearer"))
    body, content_type = render_metrics()
    return Response(body, content_type=content_type)
