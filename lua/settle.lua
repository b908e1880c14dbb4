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

--#include windows
local LEDGER_FIELDS = {'in', 'cin', 'out', 'usd', 'req'}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local charged_at = tonumber(ARGV[1])
local changed = 0
local writes = {}

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
        local last, total, w, ring, tail = read_window(raw, kind)
        tail = tail or {}
        if not last then return bad(i, 'not a sliding window') end
        local slot = b / 60
        local idx = math.floor(charged_at / slot)
        local tail_out
        if idx > last and math.floor(now / slot) - idx < SLOTS then
          -- A waiter's slot ahead of the ring: its tail entry moves; one at 0 leaves the
          -- tail, so a hang-up leaves no trace in anyone's schedule.
          local parts, prev = {}, last
          for _, t in ipairs(tail) do
            local at, held = t[1], t[2]
            -- a slot of the tail that is missing (a settle after expiry) comes back
            if idx > prev and idx < at and delta > 0 then
              parts[#parts + 1] = pack('<dd', idx, delta)
            end
            if at == idx then held = math.max(0, held + delta) end
            if held > 0 then parts[#parts + 1] = pack('<dd', at, held) end
            prev = at
          end
          if idx > prev and delta > 0 then parts[#parts + 1] = pack('<dd', idx, delta) end
          tail_out = table.concat(parts)
        -- The slot is still in the ring while no later write has moved past it.
        elseif idx <= last and last - idx < SLOTS and math.floor(now / slot) - idx < SLOTS then
          local off = (idx % SLOTS) * w
          local held = unpack(FMT[w], ring, off + 1)
          local new = math.max(0, held + delta)
          total = math.max(0, total + (new - held))
          -- Wider if the count or the total no longer fits (a settle never narrows it).
          local w2 = math.max(w, width_for(total), width_for(new))
          if w2 ~= w then ring, w = rewidth(ring, w, w2) end
          off = (idx % SLOTS) * w
          ring = string.sub(ring, 1, off) .. pack(FMT[w], new) .. string.sub(ring, off + w + 1)
          local parts = {}
          for _, t in ipairs(tail) do parts[#parts + 1] = pack('<dd', t[1], t[2]) end
          tail_out = table.concat(parts)
        end
        if tail_out then
          -- Rewritten in acquire.lua's layout (a value in the layout before it converts here).
          if width_for(total) > w then ring, w = rewidth(ring, w, width_for(total)) end
          local state = pack(HEAD_FMT[w], w, last, total) .. ring .. tail_out
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
