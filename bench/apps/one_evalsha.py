"""Contender ``one-evalsha``: the issue's yardstick, a bare prototype of one limiter call.

Per request: one EVALSHA of the article's token-bucket script for the user through redis-py
(its Script object), and nothing else — no edge, no quota, no headers, no metrics. It shows
what a single round trip from Flask costs on this machine, which is the floor any limiter
that asks Redis on every request stands on.
"""

from __future__ import annotations

import time

import redis
from flask import jsonify

from bench.apps.article_logic import TOKEN_BUCKET_LUA, user_key
from bench.apps.common import (
    BUCKET_CAPACITY,
    BUCKET_REFILL_PER_SECOND,
    REDIS_URL,
    echo_reply,
    new_app,
    parse_chat,
)

app = new_app(__name__)
_bucket = redis.Redis.from_url(REDIS_URL).register_script(TOKEN_BUCKET_LUA)


@app.post("/chat")
def chat():
    message, user_id = parse_chat()
    _bucket(keys=[user_key(user_id)],
            args=[BUCKET_CAPACITY, BUCKET_REFILL_PER_SECOND, 1, time.time()])
    return jsonify(echo_reply(message))
