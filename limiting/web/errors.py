"""The limiter's refusals as exceptions, rendered as JSON by the app's error handlers."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from flask import Response
from werkzeug.exceptions import BadRequest, ServiceUnavailable, TooManyRequests

from ..core.decision import Decision, GuardRefused, LayerState, Refused
from ..core.headers import rate_limit_headers


class RateLimited(TooManyRequests):
    """A layer refused; ``layer`` names it, ``retry_after`` is the honest wait in seconds."""

    def __init__(self, layer: str, retry_after: int, headers: dict[str, str],
                 message: str | None = None, unit: str = "requests") -> None:
        super().__init__(message or f"Rate limit exceeded ({layer}); retry after {retry_after}s.")
        self.layer = layer
        self.unit = unit          # what the refusing layer counts (dialects name it by this)
        self.retry_after = retry_after
        self.limit_headers = headers
        # The refusing layer's limit, window, what remains and when it is full again.
        self.detail: dict[str, Any] = {}

    @classmethod
    def from_decision(cls, decision: Decision, headers: dict[str, str]) -> RateLimited:
        refusal = cls._from_decision(decision, headers)
        refused = decision.refused
        if refused is not None:
            refusal.detail = limit_detail(refused)
        return refusal

    @classmethod
    def _from_decision(cls, decision: Decision, headers: dict[str, str]) -> RateLimited:
        layer = decision.refused.layer.name if decision.refused else "unknown"
        unit = decision.refused.layer.unit if decision.refused else "requests"
        if decision.wait is None:
            return cls(layer, 0, headers,
                       f"This request exceeds the {layer} limit and can never pass.", unit)
        if unit == "leases":
            # The TTL is only the latest moment; any of the caller's calls may end sooner.
            return cls(layer, decision.retry_after, headers,
                       f"Too many requests in flight ({layer}): a slot frees as soon as one of "
                       f"your requests in flight finishes, at the latest in "
                       f"{decision.retry_after}s.", unit)
        return cls(layer, decision.retry_after, headers, unit=unit)

    def body(self) -> dict[str, Any]:
        return {"error": self.description, "code": "rate_limited", "layer": self.layer,
                "retry_after": self.retry_after, **self.detail}


def limit_detail(state: LayerState) -> dict[str, Any]:
    """What a 429 says of the layer that refused: its limit and window (in its unit), what
    remains and in how many seconds it is full again."""
    layer = state.layer
    return {"limit": round(layer.limit, 3), "window_seconds": layer.window, "unit": layer.unit,
            "remaining": max(0, state.remaining), "resets_in_seconds": math.ceil(state.reset)}


class ExceedsLimit(BadRequest):
    """The request alone is more than a layer ever allows (e.g. max_tokens over the plan's
    tokens per minute): waiting cannot help, so it is a 400, not a 429 a client would retry."""

    def __init__(self, layer: str, headers: dict[str, str]) -> None:
        super().__init__(f"This request alone exceeds the {layer} limit of your plan; "
                         "send a smaller one.")
        self.layer = layer
        self.limit_headers = headers
        self.retry_after = 0

    def body(self) -> dict[str, Any]:
        return {"error": self.description, "code": "exceeds_limit", "layer": self.layer}


class ExceedsUpstream(ExceedsLimit):
    """The request alone needs more tokens than the model's shared guard lets through in a
    minute: every user of the model shares that limit, and no wait makes this one fit."""

    def __init__(self, model: str) -> None:
        super().__init__(f"upstream:{model}", {})
        self.description = (f"This request alone needs more tokens than model {model!r} "
                            "allows in a minute for everyone; it can never pass. Send fewer "
                            "input tokens or a lower max_tokens.")


class UpstreamSaturated(ServiceUnavailable):
    """The model's upstream guard refused: the provider is at its limit, not the user."""

    def __init__(self, model: str, retry_after: int) -> None:
        super().__init__(f"The upstream for model {model!r} is saturated; retry after "
                         f"{retry_after}s.")
        self.model = model
        self.retry_after = retry_after

    def body(self) -> dict[str, object]:
        return {"error": self.description, "code": "upstream_saturated",
                "layer": f"upstream:{self.model}", "retry_after": self.retry_after}


class LimiterUnavailable(ServiceUnavailable):
    """The store is away and a fail_closed layer will not guess."""

    def __init__(self, retry_after: int = 1) -> None:
        super().__init__("The rate limiter's store is unavailable; retry shortly.")
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"error": self.description, "code": "limiter_unavailable",
                "retry_after": self.retry_after}


def refusal_error(refusal: Refused | GuardRefused
                  ) -> RateLimited | ExceedsLimit | UpstreamSaturated | LimiterUnavailable:
    """The one map from the core's refusals to HTTP: a wait is a 429 (503 for the model's
    guard: the provider is full, not the user), no wait ever helping is a 400, and the store
    away with a fail_closed layer is a 503."""
    if isinstance(refusal, GuardRefused):
        retry = refusal.retry_after
        if retry is None:
            return ExceedsUpstream(refusal.model)
        return UpstreamSaturated(refusal.model, retry)
    decision = refusal.decision
    if decision.unavailable:
        return LimiterUnavailable(max(1, decision.retry_after))
    if decision.wait is None:
        layer = decision.refused.layer.name if decision.refused else "unknown"
        return ExceedsLimit(layer, rate_limit_headers(decision))
    return RateLimited.from_decision(decision, rate_limit_headers(decision))


def json_response(status: int, body: Mapping[str, Any],
                  headers: Mapping[str, str] | None = None,
                  retry_after: object = None) -> Response:
    """Every JSON error the app answers, in one place: the body, its status, its headers and
    Retry-After (whole seconds) when there is a wait to tell (werkzeug types the exceptions'
    ``retry_after`` loosely; ours are ints)."""
    # Built directly, not by jsonify: a refusal under abuse is the hot path, and each header
    # set on a made Response is looked up first.
    text = json_text(body)
    extra = list(headers.items()) if headers else []
    if isinstance(retry_after, int) and retry_after > 0:
        extra = [(name, value) for name, value in extra if name.lower() != "retry-after"]
        extra.append(("Retry-After", str(retry_after)))
    return Response(text, status=status, headers=extra, mimetype="application/json")


def json_text(body: Mapping[str, Any]) -> str:
    """A JSON body as Flask's jsonify writes it: sorted, compact, and a newline."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), default=str) + "\n"
