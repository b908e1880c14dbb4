"""POST /chat — the source article's contract: {"message", "user_id", "model"?} → {"reply"}.

Who pays: with REQUIRE_API_KEY on (the default once a provider key is set) the API key's user,
and a body user_id may not name anyone else; with it off, the body's user_id — a claim anyone
can make, so those ids have limits of their own and never spend a key holder's.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, request
from werkzeug.exceptions import Forbidden, Unauthorized

from limiting.core.llm import estimate_input_tokens
from limiting.keys import KeyRecord, presented_key
from limiting.providers import LLMRequest, api_for, check_available, provider_for
from limiting.web.credentials import InvalidToken
from limiting.web.extension import RateLimiter, current_limiter
from limiting.web.gate import payer
from limiting.web.payer import plan

from .v1.serve import observer
from .validation import json_object, string_field, user_id_field

bp = Blueprint("chat", __name__)


@bp.post("/chat")
# Who pays: the key's user with REQUIRE_API_KEY, else user_id (a key sent along is ignored).
@plan(user_from=("key", "user_id"), key_setting="REQUIRE_API_KEY")
def chat() -> dict[str, Any]:
    limiter = current_limiter()
    key = _key_user(limiter) if current_app.config.get("REQUIRE_API_KEY") else None
    body = json_object()
    message = string_field(body, "message", required=True) or ""
    if key is not None:
        claimed = string_field(body, "user_id")
        if claimed is not None and claimed != key.user:
            raise Forbidden("'user_id' must be the API key's own user (or left out).")
        user, plan, org, anonymous, tags = key.user, key.plan, key.org, False, key.tags
    else:   # a body's claim: no key, so no tags
        user, plan, org, anonymous, tags = user_id_field(body), None, None, True, ()
    model = string_field(body, "model") or current_app.config.get("DEFAULT_MODEL", "echo")
    provider = provider_for(model, limiter.policy)
    check_available(provider, model)
    # Resolved once for the request: acquire/reserve below charge this same payer.
    who = payer(limiter.policy, user, plan, anonymous=anonymous, key_org=org, tags=tags)
    plan_obj, org_obj = who.plan, who.org
    api = api_for(provider)
    if provider == "echo" and not plan_obj.meters_units \
            and not (org_obj is not None and org_obj.meters_units) \
            and not any(t.meters_units for t in limiter.engine.tag_tables(tags)):
        # Nothing to reserve, settle or guard: one request, one decision (and no estimate).
        limiter.acquire(user, plan, anonymous=anonymous, org=org, tags=tags)
        call = _request(model, provider, message, plan_obj.default_max_tokens, estimate=False)
        return {"reply": api.complete(call, _no_observer)[0]}
    call = _request(model, provider, message, plan_obj.default_max_tokens)
    spend = limiter.reserve(user, model, call.estimate, call.reserved_output, plan,
                            anonymous=anonymous, org=org, key_id=key.key_id if key else None,
                            tags=tags,
                            renews=provider != "echo")  # in-process: cannot outlive a lease
    with spend:   # renews the lease; an exception cancels or charges by the billing rule
        reply, usage = api.complete(call, observer(model))
        if usage is not None:   # no usage report: charged as reserved, by the rule
            spend.settle(usage)
    return {"reply": reply}


def _request(model: str, provider: str, message: str, max_tokens: int,
             estimate: bool = True) -> LLMRequest:
    """One user turn, in the names both provider APIs share (``estimate``: of its input
    tokens, for a reservation)."""
    messages = [{"role": "user", "content": message}]
    tokens = estimate_input_tokens(messages, model=model) if estimate else 0
    return LLMRequest(model, provider, messages, max_tokens, tokens,
                      {"model": model, "messages": messages, "max_tokens": max_tokens})


def _key_user(limiter: RateLimiter) -> KeyRecord:
    """With REQUIRE_API_KEY, /chat's user is the key's (Bearer or X-API-Key)."""
    try:
        record = limiter.authenticate(presented_key(request.headers))
    except InvalidToken as exc:
        raise Unauthorized(str(exc)) from None
    if record is None:
        raise Unauthorized("A valid API key is required (Authorization: Bearer KEY).")
    return record


def _no_observer(headers: object, status: int, tokens: int) -> None:
    """echo has no provider headers to learn from."""
