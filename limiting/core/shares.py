"""The policy each gunicorn worker enforces alone while the shared store is away (the local
fallback, ``[store] local_fallback``): every limit divided among the workers, so that
together they still hold the line."""

from __future__ import annotations

import math
from dataclasses import replace
from types import MappingProxyType
from typing import Any

from .policy import Plan, Policy


def per_worker(policy: Policy, workers: int) -> Policy:
    """The policy each of ``workers`` processes enforces alone while the store is away:
    every limit divided among them, so together they still hold the line."""
    if workers <= 1:
        return policy

    def share(value: float | None) -> Any:
        if not value:   # None, or an org's 0: no such layer
            return value
        part = value / workers
        return max(1, math.floor(part)) if isinstance(value, int) else part

    def shared(plan: Plan) -> Plan:
        return replace(
            plan, burst=share(plan.burst), refill_per_second=plan.refill_per_second / workers,
            quotas=tuple(replace(q, amount=share(q.amount)) for q in plan.quotas),
            tokens_per_minute=share(plan.tokens_per_minute),
            input_tokens_per_minute=share(plan.input_tokens_per_minute),
            output_tokens_per_minute=share(plan.output_tokens_per_minute),
            max_concurrent=share(plan.max_concurrent),
            budget_usd_per_day=share(plan.budget_usd_per_day),
            tokens_per_day=share(plan.tokens_per_day),
            budget_usd_per_month=share(plan.budget_usd_per_month))

    # Overrides live in the store that is away; the fallback enforces the file's plans.
    return replace(policy, edge_per_ip=(), overrides=None,
                   plans=MappingProxyType({n: shared(p) for n, p in policy.plans.items()}),
                   orgs=MappingProxyType({n: shared(o) for n, o in policy.orgs.items()}))
