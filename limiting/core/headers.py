"""RateLimit headers (draft-ietf-httpapi-ratelimit-headers) and the X-RateLimit-* trio."""

from __future__ import annotations

import math

from .decision import Decision, LayerState

# '"name";r=' per layer name: written on every response, rendered once per name.
_PREFIX: dict[str, str] = {}


def _prefix(name: str) -> str:
    found = _PREFIX.get(name)
    if found is None:
        found = _PREFIX[name] = f'"{name}";r='
    return found


def rate_limit_headers(decision: Decision) -> dict[str, str]:
    """Headers for a limited route's response; X-RateLimit-* describe the tightest layer."""
    states = decision.states
    tight: LayerState | None = decision.refused
    if tight is None:
        if not states:
            return {}
        tight = states[0]
        for s in states[1:]:   # the fewest remaining; of equals, the longest to reset
            if s.remaining < tight.remaining or (s.remaining == tight.remaining
                                                 and s.reset > tight.reset):
                tight = s
    reset = str(math.ceil(tight.reset))
    headers = {
        "RateLimit-Policy": decision.policy_header,
        "RateLimit": ", ".join([f"{_prefix(s.layer.name)}{s.remaining};t={math.ceil(s.reset)}"
                                for s in states]),
        "X-RateLimit-Limit": str(int(tight.layer.limit)),
        "X-RateLimit-Remaining": str(tight.remaining),
        "X-RateLimit-Reset": reset,
    }
    if not decision.allowed and decision.wait is not None:
        headers["Retry-After"] = headers["X-RateLimit-Reset"] = str(decision.retry_after)
    return headers
