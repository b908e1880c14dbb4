"""GET /healthz — is the store answering? Exempt from the edge so probes never get 429."""

from __future__ import annotations

import os

from flask import Blueprint

from limiting import current_limiter

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> tuple[dict[str, object], int]:
    ok = current_limiter().store.ping()
    body = {"status": "ok" if ok else "degraded", "store": "ok" if ok else "unreachable",
            "worker": os.getpid()}
    return body, 200 if ok else 503
