"""Layered rate limits for LLM APIs on Flask: edge per IP, then a user's bucket, quotas and
LLM units in one atomic Redis call, then the upstream guard.

Names are imported on first use, so that gunicorn's master can use ``limiting.stores.embedded``
without importing Flask, redis or ssl before gevent patches the workers.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Decision": "core.decision", "LayerState": "core.decision",
    "LimiterUnavailable": "web.errors", "RateLimited": "web.errors",
    "RateLimiter": "web.extension", "current_limiter": "web.extension", "limited": "web.extension",
    "limited_route": "web.extension",
    "Usage": "core.llm", "estimate_input_tokens": "core.llm",
    "Reservation": "reservation", "UpstreamSaturated": "reservation",
    "provider_billed": "core.lease",
    "ModelPolicy": "core.policy", "Plan": "core.policy", "Policy": "core.policy",
    "PolicyError": "core.policy",
    "Window": "core.policy", "load_policy": "core.policy", "parse_policy": "core.policy",
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
    from .core.decision import Decision, LayerState
    from .core.lease import provider_billed
    from .core.llm import Usage, estimate_input_tokens
    from .core.policy import (
        ModelPolicy,
        Plan,
        Policy,
        PolicyError,
        Window,
        load_policy,
        parse_policy,
    )
    from .reservation import Reservation, UpstreamSaturated
    from .web.errors import LimiterUnavailable, RateLimited
    from .web.extension import RateLimiter, current_limiter, limited, limited_route
