"""Layered rate limits for LLM APIs on Flask: edge per IP, then a user's bucket, quotas and
LLM units in one atomic Redis call, then the upstream guard.

Names are imported on first use, so that gunicorn's master can use ``limiting.embedded``
without importing Flask, redis or ssl before gevent patches the workers.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Decision": "decision", "LayerState": "decision",
    "LimiterUnavailable": "errors", "RateLimited": "errors",
    "RateLimiter": "extension", "current_limiter": "extension", "limited": "extension",
    "limited_route": "extension",
    "Usage": "llm", "estimate_input_tokens": "llm",
    "Reservation": "reservation", "UpstreamSaturated": "reservation",
    "provider_billed": "lease",
    "ModelPolicy": "policy", "Plan": "policy", "Policy": "policy", "PolicyError": "policy",
    "Window": "policy", "load_policy": "policy", "parse_policy": "policy",
}

__all__ = [
    "Decision",
    "LayerState",
    "LimiterUnavailable",
    "ModelPolicy",
    "Plan",
    "Policy",
    "PolicyError",
    "RateLimited",
    "RateLimiter",
    "Reservation",
    "UpstreamSaturated",
    "Usage",
    "Window",
    "current_limiter",
    "estimate_input_tokens",
    "limited",
    "limited_route",
    "load_policy",
    "parse_policy",
    "provider_billed",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'limiting' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from .decision import Decision, LayerState
    from .errors import LimiterUnavailable, RateLimited
    from .extension import RateLimiter, current_limiter, limited, limited_route
    from .lease import provider_billed
    from .llm import Usage, estimate_input_tokens
    from .policy import (
        ModelPolicy,
        Plan,
        Policy,
        PolicyError,
        Window,
        load_policy,
        parse_policy,
    )
    from .reservation import Reservation, UpstreamSaturated
