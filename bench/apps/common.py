"""The /chat handler every Flask contender shares, so only the limiter differs.

It follows the article's contract: ``{"message": str, "user_id": str, "model"?: str}``
answered by ``200 {"reply": str}``; the model is an echo.
"""

from __future__ import annotations

from flask import Flask, jsonify, request

from bench.apps.settings import (  # noqa: F401  (re-exported for the apps)
    BUCKET_CAPACITY,
    BUCKET_REFILL_PER_SECOND,
    DAILY_QUOTA,
    EDGE_PER_IP,
    REDIS_URL,
    USER_PER_MINUTE,
)


class BadRequest(Exception):
    pass


def parse_chat() -> tuple[str, str]:
    """(message, user_id) from the JSON body, or BadRequest."""
    payload = request.get_json(silent=True)
    if not isinstance(payload, dict):
        raise BadRequest("body must be a JSON object")
    message = payload.get("message")
    user_id = payload.get("user_id")
    if not isinstance(message, str) or not isinstance(user_id, str):
        raise BadRequest("message and user_id must be strings")
    return message, user_id


def user_id_or_anonymous() -> str:
    """Key function for per-user limits: the body's user_id."""
    payload = request.get_json(silent=True)
    if isinstance(payload, dict) and isinstance(payload.get("user_id"), str):
        return payload["user_id"]
    return "anonymous"


def echo_reply(message: str) -> dict[str, str]:
    return {"reply": f"echo: {message}"}


def bad_request(exc: BadRequest):
    return jsonify({"error": str(exc), "code": "invalid_request"}), 400


def new_app(name: str) -> Flask:
    app = Flask(name)
    app.register_error_handler(BadRequest, bad_request)
    return app
