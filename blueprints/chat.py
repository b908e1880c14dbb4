"""POST /chat — the source article's contract: {"message", "user_id", "model"?} → {"reply"}."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app

from limiting import current_limiter, estimate_input_tokens, limited_route
from providers import UpstreamError, check_available, complete, provider_for

from .validation import json_object, string_field, user_id_field

bp = Blueprint("chat", __name__)


@bp.post("/chat")
@limited_route
def chat() -> dict[str, Any]:
    body = json_object()
    message = string_field(body, "message", required=True) or ""
    user = user_id_field(body)
    limiter = current_limiter()
    model = string_field(body, "model") or current_app.config.get("DEFAULT_MODEL", "echo")
    provider = provider_for(model, limiter.policy.models)
    check_available(provider, model)
    max_tokens = limiter.policy.plan_for(user).default_max_tokens
    estimate = estimate_input_tokens([{"role": "user", "content": message}])
    reservation = limiter.reserve(user, model, estimate, max_tokens)
    try:
        reply, usage = complete(provider, model, message, max_tokens,
                                lambda headers, status: limiter.observe_upstream(model, headers,
                                                                                 status))
    except UpstreamError:
        reservation.cancel()
        raise
    reservation.settle(usage)
    return {"reply": reply}
