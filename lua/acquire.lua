-- Decide every user-side layer of one request at once, and commit only if all pass.
--
-- KEYS[i]  state of layer i; every key of one user carries the same hash tag, so this
--          script runs on one Cluster slot.
-- ARGV     4 values per layer: kind, a, b, cost
--   kind "f"  edge fixed window (Flask-Limiter's key and semantics): a = limit, b = seconds.
--             Every attempt counts, as at any edge; a refusal here ends the call before
--             any user layer is looked at. Only on a single server: its key has no hash tag.
--   kind "b"  token bucket:   a = capacity, b = refill per second
--   kind "w"  sliding window: a = limit,    b = window length in microseconds,
--             state = 61 slots of 4-byte counts; kind "W" the same with 8-byte counts
--             (token and dollar units, which outgrow 32 bits)
--
-- A layer with cost 0 is only read, never written.
-- Returns {allowed, refusing layer (0 if none), wait_us, now_us, then per layer remaining, reset_us}.
-- wait_us is the exact time until this request would pass (-1: never, its cost exceeds a limit).
-- Redis TIME is the only clock: worker clocks may disagree, the store's cannot.

local SLOTS = 61          -- 60 whole slots plus the current partial one
local pack, unpack = struct.pack, struct.unpack

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

local result = {1, 0, 0, now}
local writes = {}
local costs = {}
local worst_wait, worst_layer = 0, 0

for i = 1, #KEYS do
  local base = (i - 1) * 4
  local kind = ARGV[base + 1]
  local a = tonumber(ARGV[base + 2])
  local b = tonumber(ARGV[base + 3])
  local cost = tonumber(ARGV[base + 4])
  local remaining, reset, wait
  local raw = nil
  if kind ~= 'f' then raw = redis.call('GET', KEYS[i]) end

  if kind == 'f' then
    local count
    if cost > 0 then
      count = redis.call('INCRBY', KEYS[i], cost)
      if count == cost then redis.call('EXPIRE', KEYS[i], b) end
    else
      count = tonumber(redis.call('GET', KEYS[i]) or '0')
    end
    local ttl = redis.call('PTTL', KEYS[i])
    if ttl < 0 then ttl = 0 end
    remaining, reset = a - count, ttl * 1000
    if count > a then
      result[1], result[2], result[3] = 0, i, ttl * 1000 + 1
      result[#result + 1] = 0
      result[#result + 1] = reset
      return result
    end
    wait = 0
    cost = 0  -- already counted: nothing for the commit below
  elseif kind == 'b' then
    local tokens = a
    if raw then
      local held, at = unpack('<dd', raw)
      tokens = math.min(a, held + (now - at) * b / 1e6)
    end
    if tokens >= cost then
      tokens = tokens - cost
      wait = 0
      -- Past the time to refill, a fresh bucket says the same: let the key go.
      writes[i] = {pack('<dd', tokens, now), math.ceil((a - tokens) / b * 1000) + 1000}
    else
      wait = (cost - tokens) / b * 1e6 + 1
    end
    remaining = math.floor(tokens)
    reset = (a - tokens) / b * 1e6
  else
    local fmt, width = '<I4', 4
    if kind == 'W' then fmt, width = '<d', 8 end
    local slot = b / 60
    local cur = math.floor(now / slot)
    local last, total, state
    if raw then
      last, total = unpack('<dd', raw)
      if cur - last >= SLOTS then
        raw = nil
      else
        state = raw
        -- Slots last+1..cur reuse the ring positions of slots that have left the window.
        for k = last + 1, cur do
          local off = 16 + (k % SLOTS) * width
          local old = unpack(fmt, state, off + 1)
          if old ~= 0 then
            total = total - old
            state = state:sub(1, off) .. pack(fmt, 0) .. state:sub(off + width + 1)
          end
        end
      end
    end
    if not raw then
      last, total = cur, 0
      state = pack('<dd', cur, 0) .. string.rep('\0', SLOTS * width)
    end
    if total + cost <= a then
      local off = 16 + (cur % SLOTS) * width
      local held = unpack(fmt, state, off + 1)
      total = total + cost
      state = pack('<dd', cur, total) .. state:sub(17, off) .. pack(fmt, held + cost)
        .. state:sub(off + width + 1)
      reset = (cur + SLOTS) * slot - now
      writes[i] = {state, math.ceil(reset / 1000) + 1000}
      wait = 0
    else
      -- Oldest slot first: when enough has left the window, this request fits.
      local need, freed = total + cost - a, 0
      wait = -1
      for k = cur - SLOTS + 1, cur do
        freed = freed + unpack(fmt, state, 16 + (k % SLOTS) * width + 1)
        if freed >= need then
          wait = (k + SLOTS) * slot - now + 1
          break
        end
      end
      reset = (last + SLOTS) * slot - now
    end
    remaining = a - total
  end

  if wait < 0 then
    worst_wait, worst_layer = -1, i
  elseif wait > 0 and worst_wait >= 0 and wait > worst_wait then
    worst_wait, worst_layer = wait, i
  end
  if wait == 0 then costs[i] = cost end
  result[#result + 1] = math.max(0, math.floor(remaining))
  result[#result + 1] = math.max(0, math.ceil(reset))
end

if worst_layer ~= 0 then
  result[1], result[2], result[3] = 0, worst_layer, math.ceil(worst_wait)
  -- Nothing is charged: layers that would have passed report what they still hold.
  for i, cost in pairs(costs) do
    result[3 + 2 * i] = result[3 + 2 * i] + cost
  end
  return result
end

for i = 1, #KEYS do
  -- A cost of 0 only looks (usage pages, `flask limits show`): nothing to store.
  if costs[i] > 0 and writes[i] then
    local w = writes[i]
    redis.call('SET', KEYS[i], w[1], 'PX', w[2])
  end
end
return result
