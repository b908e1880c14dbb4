-- Settle what a reservation really used, give units back, renew or release leases.
--
-- KEYS[i]  a layer of the same user (or model) that acquire.lua charged.
-- ARGV[1]  the acquire call's now_us: which sliding-window slot holds the reservation.
-- then 3 values per layer: kind, b, delta
--   "w"/"W"  b = window in microseconds; delta = actual - reserved, applied to the slot
--            that was charged (a slot that has left the window has nothing to give back)
--   "b"      b = capacity; a negative delta puts tokens back (a refusal further on)
--   "c"      b = lease TTL in microseconds; delta = lease id: released
--   "r"      b = lease TTL in microseconds; delta = lease id: renewed from now
-- Returns the number of layers changed.

local SLOTS = 61
local pack, unpack = struct.pack, struct.unpack
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local charged_at = tonumber(ARGV[1])
local changed = 0

for i = 1, #KEYS do
  local base = 1 + (i - 1) * 3
  local kind, b = ARGV[base + 1], tonumber(ARGV[base + 2])

  if kind == 'c' then
    changed = changed + redis.call('ZREM', KEYS[i], ARGV[base + 3])
  elseif kind == 'r' then
    -- A lease already past its TTL is gone, whether or not an acquire has swept it yet.
    local until_us = tonumber(redis.call('ZSCORE', KEYS[i], ARGV[base + 3]) or '0')
    if until_us > now then
      changed = changed + redis.call('ZADD', KEYS[i], 'XX', 'CH', now + b, ARGV[base + 3])
      redis.call('PEXPIRE', KEYS[i], math.ceil(b / 1000) + 1000)
    end
  else
    local delta = tonumber(ARGV[base + 3])
    local raw = delta ~= 0 and redis.call('GET', KEYS[i])
    local ttl = raw and redis.call('PTTL', KEYS[i])
    if raw and ttl > 0 then
      if kind == 'b' then
        -- Refilling stays acquire's job: only the held tokens move.
        local held, at = unpack('<dd', raw)
        local tokens = math.max(0, math.min(b, held - delta))
        redis.call('SET', KEYS[i], pack('<dd', tokens, at), 'PX', ttl)
        changed = changed + 1
      else
        local fmt, width = '<I4', 4
        if kind == 'W' then fmt, width = '<d', 8 end
        local slot = b / 60
        local idx = math.floor(charged_at / slot)
        local last, total = unpack('<dd', raw)
        -- The slot is still in the ring while no later write has moved past it.
        if idx <= last and last - idx < SLOTS and math.floor(now / slot) - idx < SLOTS then
          local off = 16 + (idx % SLOTS) * width
          local held = unpack(fmt, raw, off + 1)
          local new = math.max(0, held + delta)
          total = math.max(0, total + (new - held))
          local state = pack('<dd', last, total) .. raw:sub(17, off) .. pack(fmt, new)
            .. raw:sub(off + width + 1)
          redis.call('SET', KEYS[i], state, 'PX', ttl)
          changed = changed + 1
        end
      end
    end
  end
end
return changed
