"""Layered rate limits for LLM APIs on Flask: edge per IP, then a user's bucket, quotas and
LLM units in one atomic Redis call, then the upstream guard.

The names below are what an app that adopts the limiter writes; everything else is importable
from the module that defines it (``limiting.core.policy``, ``limiting.keys``, ...) but is not
part of this short list. They are imported on first use, so that gunicorn's master can use
``limiting.stores.embedded`` without importing Flask, redis or ssl before gevent patches the
workers.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, tuple[str, str]] = {
    # The extension, and the decorators that say what a route costs.
    "RateLimiter": ("web.extension", "RateLimiter"),
    "current_limiter": ("web.extension", "current_limiter"),
    "plan": ("web.payer", "plan"),
    "token_bucket": ("web.routes", "token_bucket"),
    "sliding_window": ("web.routes", "sliding_window"),
    # LLM calls: reserve, then settle what the provider reports.
    "Reservation": ("reservation", "Reservation"),
    "Usage": ("core.llm", "Usage"),
    "estimate_input_tokens": ("core.llm", "estimate_input_tokens"),
    # The request's verdict, and the errors an app may catch or render.
    "Decision": ("core.decision", "Decision"),
    "request_limits": ("web.context", "request_limits"),
    "RateLimited": ("web.errors", "RateLimited"),
    "ExceedsLimit": ("web.errors", "ExceedsLimit"),
    "UpstreamSaturated": ("web.errors", "UpstreamSaturated"),
    "LimiterUnavailable": ("web.errors", "LimiterUnavailable"),
    # The policy, and a store of your own.
    "Policy": ("core.policy", "Policy"),
    "PolicyError": ("core.policy", "PolicyError"),
    "load_policy": ("core.policy", "load_policy"),
    "parse_policy": ("core.policy", "parse_policy"),
    "register_store": ("stores.storage", "register_store"),
}

__all__ = [
    "Decision",
    "ExceedsLimit",
    "LimiterUnavailable",
    "Policy",
    "PolicyError",
    "RateLimited",
    "RateLimiter",
    "Reservation",
    "UpstreamSaturated",
    "Usage",
    "current_limiter",
    "estimate_input_tokens",
    "load_policy",
    "parse_policy",
    "plan",
    "register_store",
    "request_limits",
    "sliding_window",
    "token_bucket",
]


def __getattr__(name: str) -> Any:
    found = _EXPORTS.get(name)
    if found is None:
        raise AttributeError(f"module 'limiting' has no attribute {name!r}")
    module, attr = found
    value = getattr(import_module(f".{module}", __name__), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:
    from .core.decision import Decision
    from .core.llm import Usage, estimate_input_tokens
    from .core.policy import Policy, PolicyError, load_policy, parse_policy
    from .reservation import Reservation
    from .stores.storage import register_store
    from .web.context import request_limits
    from .web.errors import ExceedsLimit, LimiterUnavailable, RateLimited, UpstreamSaturated
    from .web.extension import RateLimiter, current_limiter
    from .web.payer import plan
    from .web.routes import sliding_window, token_bucket
