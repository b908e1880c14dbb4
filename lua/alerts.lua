-- Alerts: a crossing claimed once, and the webhook outbox (limiting/alerts.py).
-- ARGV[1] is the command. The outbox is three keys in one slot ({alerts} hash tag):
--   KEYS[1] outbox   sorted set: event id -> when it is due (ms)
--   KEYS[2] events   hash: event id -> its JSON body
--   KEYS[3] attempts hash: event id -> attempts made
-- "once" takes one key of its own: KEYS[1], claimed for ARGV[2] ms.
local cmd = ARGV[1]

if cmd == 'once' then
  if redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[2]) then return 1 end
  return 0
end

if cmd == 'put' then   -- id, body, due_ms
  redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
  redis.call('ZADD', KEYS[1], ARGV[4], ARGV[2])
  return 1
end

if cmd == 'due' then   -- now_ms, lease_ms, limit: each taken is held until now + lease
  local now, lease = tonumber(ARGV[2]), tonumber(ARGV[3])
  local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[4]))
  local out = {}
  for _, id in ipairs(ids) do
    local body = redis.call('HGET', KEYS[2], id)
    if body then
      redis.call('ZADD', KEYS[1], now + lease, id)
      out[#out + 1] = id
      out[#out + 1] = body
      out[#out + 1] = tonumber(redis.call('HGET', KEYS[3], id) or '0')
    else                -- its body is gone: nothing to send
      redis.call('ZREM', KEYS[1], id)
      redis.call('HDEL', KEYS[3], id)
    end
  end
  return out
end

if cmd == 'done' then   -- id
  redis.call('ZREM', KEYS[1], ARGV[2])
  redis.call('HDEL', KEYS[2], ARGV[2])
  redis.call('HDEL', KEYS[3], ARGV[2])
  return 1
end

if cmd == 'retry' then   -- id, due_ms: one more attempt made
  if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 then
    redis.call('HINCRBY', KEYS[3], ARGV[2], 1)
    redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
  end
  return 1
end

return redis.error_reply('alerts.lua: unknown command ' .. tostring(cmd))
