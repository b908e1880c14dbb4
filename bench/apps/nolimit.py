"""Contender ``none``: the echo /chat with no limiter at all."""

from __future__ import annotations

from flask import jsonify

from bench.apps.common import echo_reply, new_app, parse_chat

app = new_app(__name__)


@app.post("/chat")
def chat():
    message, _user_id = parse_chat()
    return jsonify(echo_reply(message))
