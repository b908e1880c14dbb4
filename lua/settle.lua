-- Settle what a reservation really used, give units back, renew or release leases.
--
-- KEYS[i]  a layer of the same user (or model) that acquire.lua charged.
-- ARGV[1]  the acquire call's now_us: which sliding-window slot holds the reservation.
-- then 3 values per layer: kind, b, delta
--   "w"/"W"  b = window in microseconds; delta = actual - reserved, applied to the slot
--            that was charged, in the ring or in the tail of waiters' slots ahead of it (a
--            slot that has left the window has nothing to give back)
--   "b"      b = capacity; a negative delta puts tokens back (a refusal further on)
--   "m"      b = the month charged (year * 12 + month - 1 of the acquire's now_us); delta is
--            applied to the count if it still is that month's (an ended month gives nothing)
--   "c"      b = lease TTL in microseconds; delta = lease id: released
--   "r"      b = lease TTL in microseconds; delta = lease id: renewed from now
--   "h"      the spend ledger: b = when the day's key expires (unix ms); delta = integers
--            "in cin out usd req" added to those fields of the day's hash (limiting/ledger.py)
--   "z"      b = as "h"; delta = "score member": the member's score in a day's ranking
-- Returns the number of layers changed (ledger items are not counted).
--
-- All or nothing, as acquire.lua: the first pass reads and checks every key (a key of the
-- wrong type or a value this script did not write answers an error before any write); the
-- second pass writes what the first computed. No count is driven below zero.

local SLOTS = 61
local LEDGER_FIELDS = {'in', 'cin', 'out', 'usd', 'req'}
local pack, unpack = struct.pack, struct.unpack
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local charged_at = tonumber(ARGV[1])
local changed = 0
local writes = {}

local function finite(x)
  return x ~= nil and x == x and x > -math.huge and x < math.huge
end

local function bad(i, what)
  return redis.error_reply('ERR settle: ' .. KEYS[i] .. ': ' .. what .. '; nothing was changed')
end

for i = 1, #KEYS do
  local base = 1 + (i - 1) * 3
  local kind, b = ARGV[base + 1], tonumber(ARGV[base + 2])

  if kind == 'h' or kind == 'z' then
    local want = kind == 'h' and 'hash' or 'zset'
    local typ = redis.call('TYPE', KEYS[i]).ok
    if typ ~= 'none' and typ ~= want then return bad(i, 'not a spend ledger ' .. want) end
    local arg = ARGV[base + 3]
    local ok = kind == 'h' and string.match(arg, '^%-?%d+ %-?%d+ %-?%d+ %-?%d+ %-?%d+$')
      or kind == 'z' and string.match(arg, '^%-?%d+ .')
    if not (ok and finite(b)) then return bad(i, 'not a spend ledger item') end
    -- b is when the day leaves the history; a day already gone is not written back.
    local ttl = math.floor(b - now / 1000)
    if ttl > 0 then writes[#writes + 1] = {kind, i, ttl} end
  elseif kind == 'c' or kind == 'r' then
    -- ZSCORE fails on a key of another type, here, before anything is written.
    local score = redis.call('ZSCORE', KEYS[i], ARGV[base + 3])
    if kind == 'c' then
      if score then writes[#writes + 1] = {'ZREM', i} end
    elseif score and tonumber(score) > now then
      -- A lease already past its TTL is gone, whether or not an acquire has swept it yet.
      writes[#writes + 1] = {'RENEW', i, now + b, math.ceil(b / 1000) + 1000}
    end
  else
    local delta = tonumber(ARGV[base + 3])
    if not finite(delta) then delta = 0 end
    local raw = delta ~= 0 and redis.call('GET', KEYS[i])
    local ttl = raw and redis.call('PTTL', KEYS[i])
    if raw and ttl > 0 then
      if kind == 'b' then
        if #raw ~= 16 then return bad(i, 'not a token bucket') end
        -- Refilling stays acquire's job: only the held tokens move.
        local held, at = unpack('<dd', raw)
        if not (finite(held) and finite(at)) then return bad(i, 'not a token bucket') end
        -- A refund pays back the debt of waiters (tokens below 0) too; a charge stops at 0.
        local tokens = math.min(b, held - delta)
        if delta > 0 then tokens = math.max(0, tokens) end
        writes[#writes + 1] = {'SET', i, pack('<dd', tokens, at), ttl}
      elseif kind == 'm' then
        if #raw ~= 16 then return bad(i, 'not a month count') end
        local month, held = unpack('<dd', raw)
        if not (finite(month) and finite(held)) then return bad(i, 'not a month count') end
        if month == b then
          writes[#writes + 1] = {'SET', i, pack('<dd', month, math.max(0, held + delta)), ttl}
        end
      else
        local fmt, width = '<I4', 4
        if kind == 'W' then fmt, width = '<d', 8 end
        local ring_end = 16 + SLOTS * width
        if #raw < ring_end or (#raw - ring_end) % (8 + width) ~= 0 then
          return bad(i, 'not a sliding window')
        end
        local slot = b / 60
        local idx = math.floor(charged_at / slot)
        local last, total = unpack('<dd', raw)
        if not (finite(last) and finite(total)) then return bad(i, 'not a sliding window') end
        if idx > last and math.floor(now / slot) - idx < SLOTS then
          -- A waiter's slot ahead of the ring: its tail entry moves; one at 0 leaves the
          -- tail, so a hang-up leaves no trace in anyone's schedule.
          local state, prev = raw:sub(1, ring_end), last
          local add = delta   -- a slot of the tail that is missing (a settle after expiry)
          if kind == 'w' then add = math.min(add, 4294967295) end
          for off = ring_end, #raw - 1, 8 + width do
            local at, held = unpack('<d', raw, off + 1), unpack(fmt, raw, off + 9)
            if not (finite(at) and finite(held) and at > prev) then
              return bad(i, 'not a sliding window')
            end
            if idx > prev and idx < at and add > 0 then
              state = state .. pack('<d', idx) .. pack(fmt, add)
            end
            if at == idx then held = math.max(0, held + delta) end
            if kind == 'w' then held = math.min(held, 4294967295) end
            if held > 0 then state = state .. pack('<d', at) .. pack(fmt, held) end
            prev = at
          end
          if idx > prev and add > 0 then state = state .. pack('<d', idx) .. pack(fmt, add) end
          writes[#writes + 1] = {'SET', i, state, ttl}
        -- The slot is still in the ring while no later write has moved past it.
        elseif idx <= last and last - idx < SLOTS and math.floor(now / slot) - idx < SLOTS then
          local off = 16 + (idx % SLOTS) * width
          local held = unpack(fmt, raw, off + 1)
          local new = math.max(0, held + delta)
          if kind == 'w' then new = math.min(new, 4294967295) end  -- what 4 bytes hold
          total = math.max(0, total + (new - held))
          local state = pack('<dd', last, total) .. raw:sub(17, off) .. pack(fmt, new)
            .. raw:sub(off + width + 1)
          writes[#writes + 1] = {'SET', i, state, ttl}
        end
      end
    end
  end
end

for _, w in ipairs(writes) do
  local key = KEYS[w[2]]
  local arg = ARGV[1 + (w[2] - 1) * 3 + 3]
  if w[1] == 'h' then
    local f = 0
    for v in string.gmatch(arg, '%S+') do
      f = f + 1
      if v ~= '0' and LEDGER_FIELDS[f] then redis.call('HINCRBY', key, LEDGER_FIELDS[f], v) end
    end
    if redis.call('EXISTS', key) == 1 then redis.call('PEXPIRE', key, w[3]) end
    changed = changed - 1
  elseif w[1] == 'z' then
    local score, member = string.match(arg, '^(%S+) (.*)$')
    redis.call('ZINCRBY', key, score, member)
    redis.call('PEXPIRE', key, w[3])
    changed = changed - 1
  elseif w[1] == 'ZREM' then
    redis.call('ZREM', key, ARGV[1 + (w[2] - 1) * 3 + 3])
  elseif w[1] == 'RENEW' then
    redis.call('ZADD', key, 'XX', 'CH', w[3], ARGV[1 + (w[2] - 1) * 3 + 3])
    redis.call('PEXPIRE', key, w[4])
  else
    redis.call('SET', key, w[3], 'PX', w[4])
  end
  changed = changed + 1
end
return changed
