"""GET /healthz and GET /metrics — exempt from the edge, so probes and scrapes never get 429."""

from __future__ import annotations

import hmac
import ipaddress
import os

from flask import Blueprint, Response, current_app, request
from werkzeug.datastructures import WWWAuthenticate
from werkzeug.exceptions import Forbidden, TooManyRequests, Unauthorized

from limiting.keys import bearer_token
from limiting.metrics import render as render_metrics
from limiting.stores.store import StoreUnavailable
from limiting.web.extension import current_limiter
from limiting.web.identity import client_ip

from .usage import admin_token

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
    """Prometheus exposition, summed over every gunicorn worker. It shows spend per plan and
    model, so with METRICS_TOKEN or ADMIN_TOKEN set it needs one of them (Bearer, or the
    password of HTTP Basic; failures limited per IP, as the admin's), and with neither it is
    served only to a client on this host (:func:`from_loopback`)."""
    tokens = [t for t in (_metrics_token(), admin_token()) if t]
    if tokens:
        presented = _presented().encode()
        # Every token compared, so timing does not tell which one was nearly right.
        ok = sum(hmac.compare_digest(presented, t.encode()) for t in tokens) > 0
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
            raise Unauthorized("Authorization: Bearer <METRICS_TOKEN or ADMIN_TOKEN> is "
                               "required.", www_authenticate=WWWAuthenticate("bearer"))
    elif not from_loopback():
        raise Forbidden("/metrics is served beyond this host only with METRICS_TOKEN or "
                        "ADMIN_TOKEN set (and presented).")
    body, content_type = render_metrics()
    return Response(body, content_type=content_type)


def _metrics_token() -> str:
    return str(current_app.config.get("METRICS_TOKEN") or os.environ.get("METRICS_TOKEN", ""))


def _presented() -> str:
    """The credential presented: a Bearer token, or the password of HTTP Basic."""
    token = bearer_token(request.headers.get("Authorization"))
    if token:
        return token
    auth = request.authorization
    return (auth.password or "") if auth is not None and auth.type == "basic" else ""


def from_loopback() -> bool:
    """Is the client on this host? Its address as ProxyFix sees it (TRUSTED_PROXIES hops of
    X-Forwarded-For believed) must be a loopback one, and no proxy may have relayed it from
    somewhere unknown: with no hops trusted, any X-Forwarded-For, Forwarded or X-Real-IP
    means the loopback peer is a proxy in front of someone else; with hops trusted, an
    X-Forwarded-For shorter than them leaves the peer's own address, so it says nothing."""
    try:
        address = ipaddress.ip_address(client_ip())
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if not address.is_loopback:
        return False
    headers = request.headers
    hops = int(current_app.config.get("TRUSTED_PROXIES")
               or os.environ.get("TRUSTED_PROXIES", "0") or 0)
    if hops <= 0:
        return not any(name in headers for name in ("X-Forwarded-For", "Forwarded",
                                                   "X-Real-IP"))
    forwarded = ",".join(headers.getlist("X-Forwarded-For")).split(",")
    return len([a for a in forwarded if a.strip()]) >= hops
