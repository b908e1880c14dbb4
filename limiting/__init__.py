"""Layered rate limits for LLM APIs on Flask: edge per IP, then a user's bucket, quotas and
LLM units in one atomic Redis call, then the upstream guard."""

from .decision import Decision, LayerState
from .errors import LimiterUnavailable, RateLimited
from .extension import RateLimiter, current_limiter, limited, limited_route
from .llm import Usage, estimate_input_tokens
from .policy import ModelPolicy, Plan, Policy, PolicyError, Window, load_policy, parse_policy
from .reservation import Reservation, UpstreamSaturated

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
]
