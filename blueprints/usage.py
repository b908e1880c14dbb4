"""GET /v1/usage for the caller; /admin/usage, a page an operator keeps open, and its JSON.

The admin credential is ADMIN_TOKEN (Bearer, or HTTP Basic with the token as password, which
a browser asks for by itself). Without ADMIN_TOKEN the admin pages are off.
"""

from __future__ import annotations

import hmac
import math
import os
from typing import Any

from flask import Blueprint, Response, current_app, render_template, request
from werkzeug.exceptions import Forbidden, Unauthorized

from limiting import Decision, current_limiter
from limiting.keys import presented_key
from limiting.store import StoreUnavailable

bp = Blueprint("usage", __name__, template_folder="templates")
MAX_USERS = 200


def layers_json(decision: Decision) -> list[dict[str, Any]]:
    # The pacing layer has no limit of its own to draw (it follows the provider's headers).
    return [{"layer": s.layer.name, "limit": s.layer.limit, "remaining": s.remaining,
             "reset": math.ceil(s.reset), "window": s.layer.window} for s in decision.states
            if s.layer.limit > 0]


@bp.get("/v1/usage")
def my_usage() -> dict[str, Any]:
    """The caller's own layers (API key from Authorization: Bearer or x-api-key)."""
    limiter = current_limiter()
    record = limiter.keys.authenticate(presented_key(request.headers))
    if record is None:
        raise Unauthorized("A valid API key is required.")
    plan = limiter.policy.plans.get(record.plan) or limiter.policy.plan_for(record.user)
    try:
        decision = limiter.engine.peek(record.user, plan)
    except StoreUnavailable:
        return {"user": record.user, "plan": plan.name, "layers": [], "store": "unreachable"}
    return {"user": record.user, "plan": plan.name, "layers": layers_json(decision)}


def require_admin() -> None:
    token = str(current_app.config.get("ADMIN_TOKEN") or os.environ.get("ADMIN_TOKEN", ""))
    if not token:
        raise Forbidden("Admin pages are off: set ADMIN_TOKEN to turn them on.")
    auth = request.authorization
    presented = ""
    if auth is not None:
        presented = (auth.token if auth.type == "bearer" else auth.password) or ""
    if not hmac.compare_digest(presented.encode(), token.encode()):
        raise Unauthorized("The admin credential is required.",
                           www_authenticate=_basic_challenge())


def _basic_challenge() -> Any:
    from werkzeug.datastructures import WWWAuthenticate

    return WWWAuthenticate("basic", {"realm": "rate limiter admin"})


def known_users() -> list[str]:
    """Users worth showing: the policy's [users], key holders, and any asked for by name."""
    limiter = current_limiter()
    asked = [u for u in request.args.get("users", "").split(",") if u]
    users = dict.fromkeys(asked + list(limiter.policy.users))
    try:
        for record in limiter.keys.list():
            users.setdefault(record.user)
    except StoreUnavailable:
        pass
    return list(users)[:MAX_USERS]


@bp.get("/admin/usage.json")
def usage_json() -> dict[str, Any]:
    require_admin()
    limiter = current_limiter()
    out: dict[str, Any] = {"users": [], "models": []}
    try:
        for user in known_users():
            plan = limiter.policy.plan_for(user)
            out["users"].append({"user": user, "plan": plan.name,
                                 "layers": layers_json(limiter.engine.peek(user))})
        for model in limiter.policy.models:
            out["models"].append({"model": model,
                                  "layers": layers_json(limiter.engine.peek_model(model))})
    except StoreUnavailable:
        out["store"] = "unreachable"
    return out


@bp.get("/admin/usage")
def usage_page() -> Response:
    require_admin()
    return Response(render_template("usage.html"), content_type="text/html; charset=utf-8")
