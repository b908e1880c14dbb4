-- Remember the provider's own pacing for one model, so every worker slows down before the
-- provider refuses. Times arrive relative (microseconds from now, -1: unknown) and are
-- stored against Redis TIME, the one clock every worker shares.
--
-- KEYS[1]  the model's pace hash
-- ARGV     requests_left, requests_reset_us, tokens_left, tokens_reset_us, hold_us

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local rl, rr, tl, tr, hold = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]),
  tonumber(ARGV[4]), tonumber(ARGV[5])
local longest = 0
if rl >= 0 and rr >= 0 then
  redis.call('HSET', KEYS[1], 'rl', rl, 'rr', now + rr)
  longest = math.max(longest, rr)
end
if tl >= 0 and tr >= 0 then
  redis.call('HSET', KEYS[1], 'tl', tl, 'tr', now + tr)
  longest = math.max(longest, tr)
end
if hold > 0 then
  local current = tonumber(redis.call('HGET', KEYS[1], 'until') or '0')
  if now + hold > current then redis.call('HSET', KEYS[1], 'until', now + hold) end
  longest = math.max(longest, hold)
end
if longest > 0 then
  local ttl = redis.call('PTTL', KEYS[1])
  local want = math.ceil(longest / 1000) + 1000
  if ttl < want then redis.call('PEXPIRE', KEYS[1], want) end
end
return 1
