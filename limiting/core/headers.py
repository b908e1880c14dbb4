"""RateLimit headers (draft-ietf-httpapi-ratelimit-headers) and the X-RateLimit-* trio."""

from __future__ import annotations

import math

from .decision import Decision


def rate_limit_headers(decision: Decision) -> dict[str, str]:
    """Headers for a limited route's response; X-RateLimit-* describe the tightest layer."""
    tight = decision.tightest
    if tight is None:
        return {}
    headers = {
        "RateLimit-Policy": decision.policy_header,
        "RateLimit": ", ".join(f'"{s.layer.name}";r={s.remaining};t={math.ceil(s.reset)}'
                               for s in decision.states),
        "X-RateLimit-Limit": str(int(tight.layer.limit)),
        "X-RateLimit-Remaining": str(tight.remaining),
        "X-RateLimit-Reset": str(math.ceil(tight.reset)),
    }
    if not decision.allowed and decision.wait is not None:
        headers["Retry-After"] = str(decision.retry_after)
        headers["X-RateLimit-Reset"] = headers["Retry-After"]
    return headers
