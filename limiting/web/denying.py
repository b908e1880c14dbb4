"""The deny cache (limiting/deny.py) on the request path: asked before the store call,
told the store's refusals after it."""

from __future__ import annotations

from flask import current_app, request

from .. import metrics
from ..core.decision import Decision, Refused
from ..core.policy import Plan
from ..deny import DenyCache
from ..engine import Engine
from .context import request_limits
from .door import early_of, learn_alias
from .errors import refusal_error
from .identity import client_ip
from .recording import record


def refuse_if_denied(deny: DenyCache | None, user: str, realm: str, plan: Plan,
                     started: float) -> None:
    """Raise the refusal now, with no store call, when this worker's deny cache knows the
    store would refuse: the same 429 (body, Retry-After, RateLimit headers) as the store's."""
    if not deny:   # off, or nothing remembered: the common case costs this test
        return
    # A request that may wait for its slot (the plan's max_wait_seconds) is the store's to
    # place: an entry answers only when its wait is longer than that.
    decision = deny.refusal(client_ip(), user, realm, plan, plan.max_wait_seconds)
    if decision is None:
        return
    metrics.count(metrics.DENY_CACHE_HITS)
    request_limits().decision = decision
    record(decision, user, started, plan.name)
    raise refusal_error(Refused(decision))


def remember_refusal(deny: DenyCache | None, engine: Engine, decision: Decision, user: str,
                     realm: str, plan: Plan, key_plan: str | None, started: float) -> None:
    """Tell the deny cache the store's refusal of a call sent at ``started``; on a view that
    lets the door refuse early, also what in the request named ``user`` (``key_plan``: the
    API key's plan, as the view passed it)."""
    if deny is None:
        return
    compiled = engine.compiled(plan)
    kept = deny.learn(decision, started, client_ip(), user, realm, plan, compiled.layers,
                      compiled.edge_count)
    if kept == "caller":
        early = early_of(current_app.view_functions.get(request.endpoint or ""))
        if early is not None:
            learn_alias(deny, early, request.headers, realm, user, key_plan)
