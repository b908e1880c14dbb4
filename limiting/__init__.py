"""Layered rate limits for LLM APIs on Flask: edge per IP, then a user's bucket, quotas and
LLM units in one atomic Redis call, then the upstream guard.

Names are imported on first use, so that gunicorn's master can use ``limiting.stores.embedded``
without importing Flask, redis or ssl before gevent patches the workers.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, tuple[str, str]] = {
    "Ask": ("core.ask", "Ask"),
    "Decision": ("core.decision", "Decision"),
    "GuardRefused": ("core.decision", "GuardRefused"),
    "Refused": ("core.decision", "Refused"),
    "Early": ("web.door", "Early"),
    "ExceedsLimit": ("web.errors", "ExceedsLimit"),
    "IMAGE_TOKENS": ("core.llm", "IMAGE_TOKENS"),
    "KeyRecord": ("keys", "KeyRecord"),
    "LayerState": ("core.decision", "LayerState"),
    "Ledger": ("ledger", "Ledger"),
    "Spend": ("ledger", "Spend"),
    "day_text": ("ledger", "day_text"),
    "parse_day": ("ledger", "parse_day"),
    "LimiterUnavailable": ("web.errors", "LimiterUnavailable"),
    "MAX_USER_ID_LENGTH": ("core.naming", "MAX_USER_ID_LENGTH"),
    "ModelPolicy": ("core.policy", "ModelPolicy"),
    "Plan": ("core.policy", "Plan"),
    "Policy": ("core.policy", "Policy"),
    "PolicyError": ("core.policy", "PolicyError"),
    "PriceTerms": ("core.pricing", "PriceTerms"),
    "PricingError": ("core.pricing", "PricingError"),
    "RateLimited": ("web.errors", "RateLimited"),
    "RateLimiter": ("web.extension", "RateLimiter"),
    "RequestLimits": ("web.context", "RequestLimits"),
    "Reservation": ("reservation", "Reservation"),
    "STANDARD": ("core.pricing", "STANDARD"),
    "StoreUnavailable": ("stores.store", "StoreUnavailable"),
    "UnpricedContent": ("core.llm", "UnpricedContent"),
    "UpstreamSaturated": ("web.errors", "UpstreamSaturated"),
    "Usage": ("core.llm", "Usage"),
    "Window": ("core.policy", "Window"),
    "anthropic_headers": ("core.provider_headers", "anthropic_headers"),
    "bearer_token": ("keys", "bearer_token"),
    "client_ip": ("web.identity", "client_ip"),
    "current_limiter": ("web.extension", "current_limiter"),
    "estimate_input_tokens": ("core.llm", "estimate_input_tokens"),
    "estimate_tokens": ("core.llm", "estimate_tokens"),
    "has_cache_control": ("core.pricing", "has_cache_control"),
    "json_response": ("web.errors", "json_response"),
    "limited": ("web.extension", "limited"),
    "limited_route": ("web.edge", "limited_route"),
    "load_policy": ("core.policy", "load_policy"),
    "openai_error_type": ("core.provider_headers", "openai_error_type"),
    "openai_headers": ("core.provider_headers", "openai_headers"),
    "parse_policy": ("core.policy", "parse_policy"),
    "presented_key": ("keys", "presented_key"),
    "provider_billed": ("core.lease", "provider_billed"),
    "rate_limit_headers": ("core.headers", "rate_limit_headers"),
    "request_limits": ("web.context", "request_limits"),
    "render_metrics": ("metrics", "render"),
    "server_tool_uses": ("core.pricing", "server_tool_uses"),
    "sliding_window": ("web.routes", "sliding_window"),
    "token_bucket": ("web.routes", "token_bucket"),
    "tier_multiplier": ("core.pricing", "tier_multiplier"),
}

__all__ = [
    "IMAGE_TOKENS",
    "MAX_USER_ID_LENGTH",
    "STANDARD",
    "Ask",
    "Decision",
    "Early",
    "ExceedsLimit",
    "GuardRefused",
    "KeyRecord",
    "LayerState",
    "Ledger",
    "LimiterUnavailable",
    "ModelPolicy",
    "Plan",
    "Policy",
    "PolicyError",
    "PriceTerms",
    "PricingError",
    "RateLimited",
    "RateLimiter",
    "Refused",
    "RequestLimits",
    "Reservation",
    "Spend",
    "StoreUnavailable",
    "UnpricedContent",
    "UpstreamSaturated",
    "Usage",
    "Window",
    "anthropic_headers",
    "bearer_token",
    "client_ip",
    "current_limiter",
    "day_text",
    "estimate_input_tokens",
    "estimate_tokens",
    "has_cache_control",
    "json_response",
    "limited",
    "limited_route",
    "load_policy",
    "openai_error_type",
    "openai_headers",
    "parse_day",
    "parse_policy",
    "presented_key",
    "provider_billed",
    "rate_limit_headers",
    "render_metrics",
    "request_limits",
    "server_tool_uses",
    "sliding_window",
    "tier_multiplier",
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


if TYPE_CHECKING:
    from .core.ask import Ask
    from .core.decision import Decision, GuardRefused, LayerState, Refused
    from .core.headers import rate_limit_headers
    from .core.lease import provider_billed
    from .core.llm import (
        IMAGE_TOKENS,
        UnpricedContent,
        Usage,
        estimate_input_tokens,
        estimate_tokens,
    )
    from .core.naming import MAX_USER_ID_LENGTH
    from .core.policy import (
        ModelPolicy,
        Plan,
        Policy,
        PolicyError,
        Window,
        load_policy,
        parse_policy,
    )
    from .core.pricing import (
        STANDARD,
        PriceTerms,
        PricingError,
        has_cache_control,
        server_tool_uses,
        tier_multiplier,
    )
    from .core.provider_headers import anthropic_headers, openai_error_type, openai_headers
    from .keys import KeyRecord, bearer_token, presented_key
    from .ledger import Ledger, Spend, day_text, parse_day
    from .metrics import render as render_metrics
    from .reservation import Reservation
    from .stores.store import StoreUnavailable
    from .web.context import RequestLimits, request_limits
    from .web.door import Early
    from .web.edge import limited_route
    from .web.errors import (
        ExceedsLimit,
        LimiterUnavailable,
        RateLimited,
        UpstreamSaturated,
        json_response,
    )
    from .web.extension import RateLimiter, current_limiter, limited
    from .web.identity import client_ip
    from .web.routes import sliding_window, token_bucket
