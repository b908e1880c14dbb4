"""Contender ``flask-limiter``: Flask-Limiter, fixed window, per-IP and per-user limits.

Storage is the bench's Valkey; headers are left at Flask-Limiter's default (off).
"""

from __future__ import annotations

from flask import jsonify
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address

from bench.apps.common import (
    EDGE_PER_IP,
    REDIS_URL,
    USER_PER_MINUTE,
    echo_reply,
    new_app,
    parse_chat,
    user_id_or_anonymous,
)


def storage_uri(url: str) -> str:
    # limits spells a unix socket redis+unix://; redis-py spells it unix://.
    if url.startswith("unix://"):
        return "redis+unix://" + url[len("unix://") :]
    return url


app = new_app(__name__)
limiter = Limiter(
    get_remote_address,
    app=app,
    storage_uri=storage_uri(REDIS_URL),
    strategy="fixed-window",
)


@app.post("/chat")
@limiter.limit(EDGE_PER_IP, key_func=get_remote_address)
@limiter.limit(USER_PER_MINUTE, key_func=user_id_or_anonymous)
def chat():
    message, _user_id = parse_chat()
    return jsonify(echo_reply(message))
