"""Every failure of a /v1 request as one neutral :class:`ApiProblem`, before a dialect dresses
it in its provider's error shape; nothing here knows either wire format."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from limiting.core.decision import Decision
from limiting.core.headers import rate_limit_headers
from limiting.providers import UnknownModel, UpstreamError
from limiting.stores.store import StoreUnavailable
from limiting.web.context import request_limits
from limiting.web.errors import ExceedsLimit, LimiterUnavailable, RateLimited, UpstreamSaturated
from limiting.web.extension import current_limiter
from limiting.web.identity import client_ip

log = logging.getLogger("limiter.v1")

# Neutral kinds of problem; each dialect maps them to its provider's error types.
AUTH = "authentication"
INVALID = "invalid_request"
NOT_FOUND = "not_found"
TOO_LARGE = "too_large"
RATE_LIMITED = "rate_limited"
SATURATED = "upstream_saturated"
UNAVAILABLE = "unavailable"
UPSTREAM = "upstream"
INTERNAL = "internal"


class ApiProblem(Exception):
    """A refusal or failure, before it is dressed in a provider's error shape."""

    def __init__(self, status: int, kind: str, message: str, *, param: str | None = None,
                 code: str | None = None, retry_after: int | None = None,
                 headers: Mapping[str, str] | None = None, layer: str | None = None,
                 unit: str = "requests") -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message
        self.param, self.code, self.retry_after, self.layer = param, code, retry_after, layer
        self.unit = unit          # what the refusing layer counts, for the dialect's type
        self.headers = dict(headers or {})
        self.detail: dict[str, Any] = {}   # a 429's layer, limit, window, remaining, reset

    def extra(self) -> dict[str, Any]:
        """Fields beside the ones each SDK reads: which layer refused, and its numbers."""
        return {"layer": self.layer, **self.detail} if self.detail else {}


def invalid(message: str, param: str | None = None) -> ApiProblem:
    return ApiProblem(400, INVALID, message, param=param, code="invalid_request")


def problem_from(exc: BaseException) -> ApiProblem:
    """Any exception of a /v1 request as a problem; unknown ones are logged as 500s."""
    if isinstance(exc, ApiProblem):
        return exc
    if isinstance(exc, RateLimited):
        problem = ApiProblem(429, RATE_LIMITED, str(exc.description), layer=exc.layer,
                             unit=exc.unit, code="rate_limit_exceeded",
                             retry_after=_seconds(exc.retry_after), headers=exc.limit_headers)
        problem.detail = exc.detail
        return problem
    if isinstance(exc, ExceedsLimit):   # before HTTPException: its code is exceeds_limit
        return ApiProblem(400, INVALID, str(exc.description), code="exceeds_limit",
                          layer=exc.layer, headers=exc.limit_headers)
    if isinstance(exc, UpstreamSaturated):
        return ApiProblem(429, SATURATED, str(exc.description), code="upstream_saturated",
                          retry_after=_seconds(exc.retry_after) or 1,
                          layer=f"upstream:{exc.model}")
    if isinstance(exc, (LimiterUnavailable, StoreUnavailable)):
        retry = getattr(exc, "retry_after", 1) or 1
        return ApiProblem(503, UNAVAILABLE, "The rate limiter's store is unavailable; "
                          "retry shortly.", code="limiter_unavailable", retry_after=retry)
    if isinstance(exc, UpstreamError):
        kind = INVALID if exc.status < 500 else UPSTREAM
        return ApiProblem(exc.status, kind, exc.message, code=exc.code,
                          retry_after=exc.retry_after)
    if isinstance(exc, UnknownModel):
        return ApiProblem(404, NOT_FOUND, str(exc), param="model", code="model_not_found")
    if isinstance(exc, RequestEntityTooLarge):
        return ApiProblem(413, TOO_LARGE, "The request body is too large.",
                          code="request_too_large")
    if isinstance(exc, HTTPException) and exc.code and exc.code < 500:
        return ApiProblem(exc.code, INVALID, str(exc.description), code="invalid_request")
    log.exception("unhandled error in /v1: %s", type(exc).__name__, exc_info=exc)
    return ApiProblem(500, INTERNAL, "The server had an error processing this request.",
                      code="internal_error")


def _seconds(value: object) -> int | None:
    """Whole seconds for Retry-After; werkzeug types the attribute loosely."""
    return value if isinstance(value, int) and value > 0 else None


def refusal(exc: BaseException,
            provider_headers: Callable[[Decision], dict[str, str]]) -> ApiProblem:
    """The problem to answer with. A request turned away before reserve() still counts at the
    edge (as the app's after_request would); counting it here lets an edge refusal speak the
    provider's shape, and the decision in request_limits() keeps it from counting twice. Our
    429s also carry the provider-style headers of the refusing decision."""
    problem = problem_from(exc)
    # The one place /v1 reads or writes the request's decision.
    limits = request_limits()
    decision = limits.decision
    if decision is None:
        decision = current_limiter().engine.charge_edge(client_ip())
        if decision is not None:
            limits.decision = decision
            if not decision.allowed:
                return refused(decision, provider_headers)
    if problem.kind == RATE_LIMITED and decision is not None:
        problem.headers = {**provider_headers(decision), **problem.headers}
    return problem


def refused(decision: Decision,
            provider_headers: Callable[[Decision], dict[str, str]]) -> ApiProblem:
    """The problem for a refusal the limiter remembered (its door answers it with no request
    context): the one :func:`refusal` makes for the same decision raised in the view."""
    problem = problem_from(RateLimited.from_decision(decision, rate_limit_headers(decision)))
    problem.headers = {**provider_headers(decision), **problem.headers}
    return problem
