-- Remember the provider's own pacing for one model, so every worker slows down before the
-- provider refuses. Times arrive relative (microseconds from now, -1: unknown) and are
-- stored against Redis TIME, the one clock every worker shares.
--
-- KEYS[1]  the model's pace hash
-- ARGV     requests_left, requests_reset_us, tokens_left, tokens_reset_us, hold_us
--
-- A value that is not a finite number of at least 0 is unknown, whatever sent it; counts
-- are kept to 2^53 and times to a day, so what acquire.lua reads back is always sound.

local MAX_COUNT, MAX_US = 2^53, 86400 * 1000000

local function arg(value, most)
  local x = tonumber(value)
  if x == nil or x ~= x or x < 0 then return -1 end
  return math.min(math.floor(x), most)
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local rl, rr = arg(ARGV[1], MAX_COUNT), arg(ARGV[2], MAX_US)
local tl, tr = arg(ARGV[3], MAX_COUNT), arg(ARGV[4], MAX_US)
local hold = arg(ARGV[5], MAX_US)
-- Read first: a key of another type fails here, before anything is written.
local current = tonumber(redis.call('HGET', KEYS[1], 'until'))
if current == nil or current ~= current then current = 0 end
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
  if now + hold > current or current > now + MAX_US then
    redis.call('HSET', KEYS[1], 'until', now + hold)
  end
  longest = math.max(longest, hold)
end
if longest > 0 then
  local ttl = redis.call('PTTL', KEYS[1])
  local want = math.ceil(longest / 1000) + 1000
  if ttl < want then redis.call('PEXPIRE', KEYS[1], want) end
end
return 1
