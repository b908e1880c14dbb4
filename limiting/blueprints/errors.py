"""Every error as JSON with a code: bad input is a 4xx the client can read, never a traceback."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response
from werkzeug.exceptions import HTTPException, InternalServerError

from limiting.providers import ProviderKeyMissing, UnknownModel, UpstreamError
from limiting.stores.store import StoreUnavailable
from limiting.web.errors import LimiterUnavailable, json_response

log = logging.getLogger("limiter.errors")

_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    415: "invalid_request",
    429: "rate_limited",
    500: "internal_error",
    503: "unavailable",
}


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return json_response(status, body, headers)


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        # The exception's own headers (Allow, WWW-Authenticate, Retry-After) travel along.
        headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
        return _json(status, {"error": exc.description, "code": _CODES.get(status, "error")},
                     headers)

    @app.errorhandler(UnknownModel)
    def unknown_model(exc: UnknownModel) -> Response:
        # Not under [models]: unpriced and unguarded, so refused before any charge.
        return _json(400, {"error": str(exc), "code": "model_not_found"})

    @app.errorhandler(ProviderKeyMissing)
    def provider_key_missing(exc: ProviderKeyMissing) -> Response:
        return _json(400, {"error": str(exc), "code": "invalid_model"})

    @app.errorhandler(UpstreamError)
    def upstream_error(exc: UpstreamError) -> Response:
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
        return _json(exc.status, exc.body(), headers)

    @app.errorhandler(StoreUnavailable)
    def store_away(exc: StoreUnavailable) -> Response:
        # Anything that needed the store and found it away (a key lookup, a usage page): the
        # same 503 a fail_closed layer answers, so clients retry instead of seeing a 500.
        log.warning("store unavailable: %s", exc)
        refusal = LimiterUnavailable(1)
        return _json(503, refusal.body(), {"Retry-After": str(refusal.retry_after)})

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        # The traceback goes to the log (no request body in it); the client gets a code.
        log.exception("unhandled error: %s", type(exc).__name__)
        err = InternalServerError()
        return _json(500, {"error": err.description, "code": "internal_error"})
