"""POST /chat — the source article's contract: {"message", "user_id", "model"?} → {"reply"}."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app

from limiting import current_limiter, limited_route
from providers import check_available, complete, provider_for

from .validation import json_object, string_field, user_id_field

bp = Blueprint("chat", __name__)


@bp.post("/chat")
@limited_route
def chat() -> dict[str, Any]:
    body = json_object()
    message = string_field(body, "message", required=True)
    user = user_id_field(body)
    limiter = current_limiter()
    model = string_field(body, "model") or current_app.config.get("DEFAULT_MODEL", "echo")
    provider = provider_for(model, limiter.policy.models)
    check_available(provider, model)
    limiter.acquire(user)
    plan = limiter.policy.plan_for(user)
    return {"reply": complete(provider, model, message or "", user, plan.default_max_tokens)}
