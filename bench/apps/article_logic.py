"""The source article's limiter, restated: its token-bucket Lua and its sorted-set quota.

Kept faithful on purpose, warts included: the script text is sent with ``EVAL`` on every
call (no ``EVALSHA``), time comes from the worker's own clock, each bucket is its own round
trip, the quota is a MULTI/EXEC pipeline of ZREMRANGEBYSCORE, ZCARD, ZADD, EXPIRE whose
member is ``str(now)``, and a refused quota call is undone with a separate ZREM.
"""

from __future__ import annotations

TOKEN_BUCKET_LUA = """
local key = KEYS[1]
local capacity = tonumber(ARGV[1])
local refill_rate = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local now = tonumber(ARGV[4])

local data = redis.call('HMGET', key, 'tokens', 'last_refill')
local tokens = tonumber(data[1]) or capacity
local last_refill = tonumber(data[2]) or now

local elapsed = now - last_refill
tokens = math.min(capacity, tokens + elapsed * refill_rate)

if tokens >= cost then
  tokens = tokens - cost
  redis.call('HMSET', key, 'tokens', tokens, 'last_refill', now)
  redis.call('EXPIRE', key, 3600)
  return 1
else
  redis.call('HMSET', key, 'tokens', tokens, 'last_refill', now)
  redis.call('EXPIRE', key, 3600)
  return 0
end
"""

IP_REFUSED = "Too many requests from this IP. Retry after a few seconds."
USER_REFUSED = "Rate limit exceeded. You can send ~30 messages per minute."
QUOTA_REFUSED = "Daily quota exceeded."
DAY_SECONDS = 86400


def ip_key(ip: str) -> str:
    return f"rl:ip:{ip}"


def user_key(user_id: str) -> str:
    return f"rl:user:{user_id}"


def quota_key(user_id: str) -> str:
    return f"quota:daily:{user_id}"
