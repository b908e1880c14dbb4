"""Every decision counted in /metrics, and refusals and fail-policy decisions logged as JSON
(refusals aggregated per subject and layer: limiting/web/logs.py)."""

from __future__ import annotations

from .. import metrics
from ..core.decision import Decision, GuardRefused
from . import logs
from .identity import client_ip


def record(decision: Decision, user: str, started: float, plan: str = "") -> None:
    """Every outcome counted (under the resolved ``plan``: "" when none was resolved);
    refusals and fail-policy decisions logged as JSON."""
    metrics.time_decision(started)
    if decision.would_refuse and decision.allowed:
        would_refuse(decision, user)
    if decision.allowed and not decision.degraded:
        metrics.allowed(plan)
        return
    if decision.unavailable:
        metrics.store_outcome("unavailable", plan)
        metrics.FAIL_POLICY.labels("fail_closed").inc()
        logs.event("fail_closed", user=user, retry_after=decision.retry_after,
                   error=decision.cause)
    elif decision.degraded:
        outcome = "fallback" if decision.states else "fail_open"
        metrics.store_outcome("allowed" if decision.allowed else "refused", plan)
        metrics.FAIL_POLICY.labels(outcome).inc()
        logs.event(outcome, user=user, allowed=decision.allowed, error=decision.cause)
    else:
        refused(decision, user, plan)


def refused(decision: Decision, user: str, plan: str = "") -> None:
    """A refusal by the user's layers (or the edge in their call), counted and logged."""
    logs.request_id()   # every refusal names its request (X-Request-ID), logged or not
    count_refusal(decision, user, client_ip(), plan)


def count_refusal(decision: Decision, user: str, ip: str, plan: str = "") -> None:
    """Count and log a refusal (no request context needed: limiting/web/door.py has none):
    an edge refusal under the client's IP, so an IP rotating user ids is one subject."""
    layer = decision.refused.layer.name if decision.refused else "unknown"
    retry = decision.retry_after if decision.wait is not None else None
    if layer == "edge":   # per IP, whoever the user: in no plan's count
        refused_by("ip", ip, layer, retry)
    else:
        refused_by("user", user, layer, retry, plan)


def refused_by(kind: str, who: str, layer: str, retry_after: int | None, plan: str = ""
               ) -> None:
    """One refusal of ``who`` (a "user", or an "ip" at the edge) by ``layer``: counted, and
    in the aggregated refusal log."""
    metrics.refused(layer, plan)
    logs.refusals.refused(kind, who, layer, retry_after)


def record_guard(refusal: GuardRefused, user: str, started: float, plan: str = "") -> None:
    """A guard refusal counted and logged under the model's layer name."""
    layer = f"upstream:{refusal.model}"
    retry = refusal.retry_after
    if retry is not None:
        metrics.time_decision(started)
        metrics.GUARD_REFUSALS.labels(refusal.model).inc()
    logs.request_id()
    refused_by("user", user, layer, retry, plan)


def would_refuse(decision: Decision, user: str) -> None:
    """Shadow layers that would have refused this admitted request: metered and logged."""
    for state in decision.would_refuse:
        metrics.WOULD_REFUSE.labels(state.layer.name).inc()
        logs.event("would_refuse", user=user, layer=state.layer.name, over=-state.remaining)
