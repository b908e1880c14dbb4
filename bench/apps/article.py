"""Contender ``article``: a synchronous Flask port of the source article's limiter.

Per request: one EVAL of the token-bucket script for the client IP, one for the user, then
the sorted-set daily quota pipeline (with ZREM when refused). Limits are the bench's
generous ones so nothing is refused.
"""

from __future__ import annotations

import time

import redis
from flask import jsonify, request

from bench.apps.article_logic import (
    DAY_SECONDS,
    IP_REFUSED,
    QUOTA_REFUSED,
    TOKEN_BUCKET_LUA,
    USER_REFUSED,
    ip_key,
    quota_key,
    user_key,
)
from bench.apps.common import (
    BUCKET_CAPACITY,
    BUCKET_REFILL_PER_SECOND,
    DAILY_QUOTA,
    REDIS_URL,
    echo_reply,
    new_app,
    parse_chat,
)

app = new_app(__name__)
_redis: redis.Redis | None = None


def get_redis() -> redis.Redis:
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    return _redis


def token_bucket_check(key: str, capacity: int, refill_rate: float, cost: int = 1) -> bool:
    now = time.time()
    result = get_redis().eval(TOKEN_BUCKET_LUA, 1, key, capacity, refill_rate, cost, now)
    return bool(result)


def sliding_window_check(
    key: str, limit: int, window_seconds: int = DAY_SECONDS
) -> tuple[bool, int]:
    r = get_redis()
    now = time.time()
    window_start = now - window_seconds
    pipe = r.pipeline()
    pipe.zremrangebyscore(key, 0, window_start)
    pipe.zcard(key)
    pipe.zadd(key, {str(now): now})
    pipe.expire(key, window_seconds)
    results = pipe.execute()
    current_count = results[1]
    if current_count >= limit:
        r.zrem(key, str(now))
        return False, 0
    return True, limit - current_count - 1


def refused(detail: str, headers: dict[str, str]):
    return jsonify({"error": detail, "code": "rate_limited"}), 429, headers


@app.post("/chat")
def chat():
    message, user_id = parse_chat()
    ip = request.remote_addr or "unknown"
    if not token_bucket_check(ip_key(ip), BUCKET_CAPACITY, BUCKET_REFILL_PER_SECOND):
        return refused(IP_REFUSED, {"Retry-After": "5"})
    if not token_bucket_check(user_key(user_id), BUCKET_CAPACITY, BUCKET_REFILL_PER_SECOND):
        return refused(USER_REFUSED, {"Retry-After": "10"})
    allowed, _remaining = sliding_window_check(quota_key(user_id), DAILY_QUOTA)
    if not allowed:
        return refused(QUOTA_REFUSED, {"X-RateLimit-Remaining": "0", "Retry-After": "86400"})
    return jsonify(echo_reply(message))
