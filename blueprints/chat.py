"""POST /chat — the source article's contract: {"message", "user_id", "model"?} → {"reply"}."""

from __future__ import annotations

import os
from typing import Any

from flask import Blueprint, current_app, request
from werkzeug.exceptions import Forbidden, Unauthorized

from limiting import RateLimiter, current_limiter, estimate_input_tokens, limited_route
from limiting.keys import KeyRecord, presented_key
from providers import UpstreamError, check_available, complete, provider_for

from .validation import json_object, string_field, user_id_field

bp = Blueprint("chat", __name__)


@bp.post("/chat")
@limited_route
def chat() -> dict[str, Any]:
    limiter = current_limiter()
    key = _key_user(limiter) if _require_key() else None
    body = json_object()
    message = string_field(body, "message", required=True) or ""
    if key is not None:
        claimed = string_field(body, "user_id")
        if claimed is not None and claimed != key.user:
            raise Forbidden("'user_id' must be the API key's own user (or left out).")
        user, plan = key.user, key.plan
    else:
        user, plan = user_id_field(body), None
    model = string_field(body, "model") or current_app.config.get("DEFAULT_MODEL", "echo")
    provider = provider_for(model, limiter.policy.models)
    check_available(provider, model)
    policy = limiter.policy
    plan_obj = policy.plans[plan] if plan else policy.plan_for(user)
    max_tokens = plan_obj.default_max_tokens
    if provider == "echo" and not plan_obj.meters_units:
        # Nothing to reserve, settle or guard: one request, one decision.
        limiter.acquire(user, plan)
        return {"reply": complete(provider, model, message, max_tokens, _no_observer)[0]}
    estimate = estimate_input_tokens([{"role": "user", "content": message}])
    reservation = limiter.reserve(user, model, estimate, max_tokens, plan)
    try:
        reply, usage = complete(provider, model, message, max_tokens,
                                lambda headers, status, tokens: limiter.observe_upstream(
                                    model, headers, status, tokens))
    except UpstreamError:
        reservation.cancel()
        raise
    reservation.settle(usage)
    return {"reply": reply}


def _require_key() -> bool:
    value = current_app.config.get("REQUIRE_API_KEY", os.environ.get("REQUIRE_API_KEY", ""))
    return str(value).lower() in ("1", "true", "yes", "on")


def _key_user(limiter: RateLimiter) -> KeyRecord:
    """With REQUIRE_API_KEY, /chat's user is the key's (Bearer or X-API-Key)."""
    record = limiter.keys.authenticate(presented_key(request.headers))
    if record is None:
        raise Unauthorized("A valid API key is required (Authorization: Bearer KEY).")
    return record


def _no_observer(headers: object, status: int, tokens: int) -> None:
    """echo has no provider headers to learn from."""
