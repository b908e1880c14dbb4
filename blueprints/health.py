"""GET /healthz and GET /metrics — exempt from the edge, so probes and scrapes never get 429."""

from __future__ import annotations

import os

from flask import Blueprint, Response

from limiting import current_limiter

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
    """Prometheus exposition, summed over every gunicorn worker."""
    from limiting.metrics import render

    body, content_type = render()
    return Response(body, content_type=content_type)
