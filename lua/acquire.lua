-- Decide every layer of one request at once, and commit only if all pass.
--
-- KEYS[i]  state of layer i. A user's keys share one hash tag (one Cluster slot); the
--          upstream guard's keys share their model's tag and go in a call of their own.
-- ARGV     4 values per layer: kind, a, b, cost
--   "f"  edge fixed window (Flask-Limiter's key and semantics): a = limit, b = seconds.
--        Every attempt counts, as at any edge; a refusal here ends the call before any
--        other layer is looked at. Single server only: its key has no hash tag.
--   "b"  token bucket: a = capacity, b = refill per second
--   "B"  a token bucket others reach too (an org's, a route scope's, one keyed by IP or a
--        header): the same state, but a waiter takes only the tokens it holds now
--   "w"  strict sliding window: a = limit, b = window in microseconds; state is 61 slots
--        of counts as wide as the limit needs (see WINDOW STATE below), then the waiters'
--        slots ahead of them ("W": the same, for tokens and micro-dollars)
--   "c"  requests in flight: a = max, b = lease TTL in microseconds, cost = lease id
--        ("-" only looks); a lease of a killed worker leaves by its TTL
--   "p"  upstream pacing learnt from provider headers (a hash written by observe.lua):
--        cost = tokens this call will use
--   "m"  count per calendar month in UTC (from 00:00 on the 1st, by the store's clock):
--        a = limit; state is the month number and the count, 16 bytes
-- A kind ending in "?" is a shadow layer: decided as any other, but it never refuses. One
-- that would refuse charges nothing and reports its remaining as what it would be had it
-- counted the request: below 0 (everywhere else remaining is at least 0).
-- A cost of 0 only looks (usage pages, `flask limits show`): nothing is written.
--
-- ARGV[#KEYS * 4 + 1], optional: the deadline in µs (a plan's max_wait_seconds). A request
-- that the bucket, a window ("w"/"W") or the provider's pacing would refuse with a wait no
-- longer than it is admitted into its future slot now, and sleeps until then: the slot is
-- taken in this call, so arrival order here is the order of service across all workers.
-- The caller's own bucket ("b") is charged as at the moment the request runs (its tokens go
-- below 0: the caller's later requests see the debt and wait behind it). A bucket shared
-- with others ("B") never waits and never goes into debt: a waiter takes the tokens it holds
-- now, or is refused at once with the time until it holds them, as a caller that does not
-- wait; a hang-up's refund puts them back (capped at the capacity), as if it never came.
-- A window charges the slot the request runs in:
-- a slot ahead of the ring goes in the window's tail (after the 61 slots: slot number and
-- count pairs, in slot order), which moves no later caller's earliest slot: a
-- charge counts in every window that holds its slot and in no other, and a request passes
-- in slot s when every window ending at s or later has room for it. So a waiter, whatever
-- its own layers make it wait for, holds back no one sharing a window with it (the
-- model's guard, an org, a route scope) beyond what its one charge takes, no window ever
-- holds more than its limit, waits included, and a hang-up's refund takes its tail entry
-- away with no trace. Edge, leases, months and shadow layers never wait: they pass now or
-- refuse.
--
-- Returns {allowed, refusing layer (0: none), wait_us, now_us, then remaining, reset_us
-- per layer}. Refused: wait_us is the exact time until this request would pass (-1: never,
-- its cost exceeds a limit). Allowed: wait_us is how long it sleeps before its slot (0: it
-- runs now). Redis TIME is the only clock.
--
-- All or nothing: every command that can fail (a key of the wrong type, a stored value that
-- is not what this script wrote) runs in the first pass, which only reads; a bad value
-- answers an error there, before anything is written. The second pass writes with commands
-- that cannot fail on the values just checked: the edge's INCRBY (every attempt counts,
-- also one a later layer refuses), then, only if every layer passed, the SETs, the lease's
-- ZADD and the pace hash's HSETs of values computed in the first pass.
--
-- WINDOW STATE ("w" and "W"): one byte, the counters' width n; the ring's newest slot (a
-- double); the total and the 61 counters, n bytes each (n = 1..6: unsigned integers, 8:
-- doubles); then the tail, {slot, count} as two doubles each. n is the narrowest that holds
-- the limit and the total (1 byte for "100 per day"): a write re-encodes the ring when that
-- changes; a count that is not a whole number keeps doubles. The length is always odd
-- (9 + 62n + 16 per tail entry). The layout before it, always of even length ({last,
-- total} as doubles; 61 counters of 4 bytes for "w", 8 for "W"; tail entries of 12 or 16
-- bytes), is read as it is and rewritten in this layout by its first write.

--#include windows
-- Locals, not a global table's field on every use: this runs on every request.
local call = redis.call
local floor, ceil, max, min = math.floor, math.ceil, math.max, math.min

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local max_wait = tonumber(ARGV[#KEYS * 4 + 1]) or 0

-- ALTERNATIVES (fallback models), optional, behind the deadline (then always sent):
--   count, g0, then per alternative: g, m, and m pairs (layer, cost) in layer order.
-- The asked model's call is layers 1..L; its guard is the last g0 of them. Each alternative
-- j's guard is g more layers behind L (in alternative order); its pairs give the cost of a
-- layer of 1..L-g0 whose cost differs at its model's prices (a dollar window). Layers of
-- neither kind are the same in every alternative: decided once. When the asked model's
-- layers refuse and none of those fixed layers does, each alternative in turn is decided
-- on its own layers (its costs, its guard) beside the fixed ones; the first that passes is
-- committed, and the reply ends with its number (0: the asked model; refused: 0, with the
-- asked model's layers and the soonest wait of all). Served by alternative j, the reply's
-- states are the first L-g0 layers' (at j's costs) then j's guard's. The edge counts once.
local alts, L, variant = nil, #KEYS, nil
if ARGV[#KEYS * 4 + 2] then
  local p = #KEYS * 4 + 2
  local count, g0 = tonumber(ARGV[p]), tonumber(ARGV[p + 1])
  p = p + 2
  alts, variant = {}, {}
  for j = 1, count do
    local g, m = tonumber(ARGV[p]), tonumber(ARGV[p + 1])
    local over = {}
    for k = 1, m do
      local i = tonumber(ARGV[p + 2 * k])
      over[k], variant[#variant + 1] = {i, ARGV[p + 2 * k + 1]}, i
    end
    alts[j] = {g, over}
    L = L - g
    p = p + 2 + 2 * m
  end
  local start = L + 1
  for j = 1, count do alts[j][3], start = start, start + alts[j][1] end
  for i = L - g0 + 1, #KEYS do variant[#variant + 1] = i end
  alts.shared = L - g0    -- the layers every alternative has (its own guard follows them)
end

local function bad(i, what)
  return redis.error_reply('ERR acquire: ' .. KEYS[i] .. ': ' .. what .. '; nothing was changed')
end

-- A pace value as observe.lua writes it; anything else (garbage, nan, inf) is unknown.
local function pace(value)
  local x = tonumber(value)
  if finite(x) then return x end
  return nil
end

-- The UTC calendar month holding µs time `us`: its number (year * 12 + month - 1), start
-- and end in µs. Civil-from-days (H. Hinnant); doubles are exact for these integers.
local MONTH_DAYS = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31}
local DAY_US = 86400000000
local function month_of(us)
  local days = floor(us / DAY_US)
  local z = days + 719468
  local era = floor(z / 146097)
  local doe = z - era * 146097
  local yoe = floor((doe - floor(doe / 1460) + floor(doe / 36524)
    - floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + floor(yoe / 4) - floor(yoe / 100))
  local mp = floor((5 * doy + 2) / 153)
  local day = doy - floor((153 * mp + 2) / 5)       -- 0 on the 1st
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400 + (m <= 2 and 1 or 0)
  local len = MONTH_DAYS[m]
  if m == 2 and y % 4 == 0 and (y % 100 ~= 0 or y % 400 == 0) then len = 29 end
  local start = days - day
  return y * 12 + m - 1, start * DAY_US, (start + len) * DAY_US
end

local result = {1, 0, 0, now}
local writes = {}
local costs = {}
local kinds = {}          -- each layer's kind, its shadow mark taken off
local edges = {}          -- {layer, cost, fresh}: written whether or not a later layer refuses
local worst_wait, worst_layer = 0, 0
local longest = 0         -- the longest wait admitted into a future slot, µs
local before = {}         -- a layer admitted into a future slot: its remaining before it

-- A window's ring moved on from slot `from` to slot `to`: the slots between leave it (their
-- places, at most two runs of the ring, are zeroed in one rebuild).
local function advance(ring, total, from, to, w)
  if to - from >= SLOTS then return rep('\0', SLOTS * w), 0 end
  local fmt, gone = FMT[w], false
  for k = from + 1, to do
    local old = unpack(fmt, ring, (k % SLOTS) * w + 1)
    if old ~= 0 then total, gone = total - old, true end
  end
  if not gone then return ring, total end
  local first, last = (from + 1) % SLOTS, to % SLOTS
  if first <= last then
    return sub(ring, 1, first * w) .. rep('\0', (last - first + 1) * w)
      .. sub(ring, (last + 1) * w + 1), total
  end
  return rep('\0', (last + 1) * w) .. sub(ring, (last + 1) * w + 1, first * w)
    .. rep('\0', (SLOTS - first) * w), total
end

local function count_edges()
  for _, e in ipairs(edges) do
    if e[3] then   -- a new window (or one at 0): what INCRBY then EXPIRE leave, in one call
      call('SET', KEYS[e[1]], e[2], 'EX', e[4])
    else
      call('INCRBY', KEYS[e[1]], e[2])
    end
  end
end

-- The layers are decided in passes: the asked model's (layers 1..L, each in its own reply
-- position); then, while the asked model is refused by its own layers alone, each
-- alternative's (`order`: {layer, reply position, cost}) beside the fixed layers' answers.
local fixed
if alts then
  fixed = {}
  for i = 1, L do fixed[i] = true end
  for _, i in ipairs(variant) do fixed[i] = nil end
end
local fixed_refused, fixed_longest = false, 0
local j, order, asked, refused, soonest = 0, nil, nil, nil, 0
while true do
  for k = 1, order and #order or L do
    local i, pos, given = k, k, nil
    if order then i, pos, given = order[k][1], order[k][2], order[k][3] end
    local base = (i - 1) * 4
    local kind = ARGV[base + 1]
    local shadow = byte(kind, -1) == 63   -- "?"
    if shadow then kind = sub(kind, 1, -2) end
    local shared = kind == 'B'
    if shared then kind = 'b' end
    kinds[i] = kind
    local a = tonumber(ARGV[base + 2])
    local b = tonumber(ARGV[base + 3])
    local cost = tonumber(given or ARGV[base + 4]) or 0
    local remaining, reset, wait, future = 0, 0, 0, 0

    if kind == 'f' then
      local raw = call('GET', KEYS[i])
      local count = 0
      if raw then
        -- What INCRBY accepts, and no more digits than a double counts exactly.
        if #raw > 15 or not (raw == '0' or string.match(raw, '^%-?[1-9]%d*$')) then
          return bad(i, 'not a count')
        end
        count = tonumber(raw)
      end
      local ttl
      if cost > 0 then
        count = count + cost
        edges[#edges + 1] = {i, cost, count == cost, b}
      end
      if cost > 0 and count == cost then
        ttl = b * 1000
      else
        ttl = call('PTTL', KEYS[i])
        if ttl < 0 then ttl = 0 end
      end
      remaining, reset = a - count, ttl * 1000
      if count > a then
        -- A refusal here ends the call before any other layer is looked at.
        count_edges()
        result[1], result[2], result[3] = 0, pos, ttl * 1000 + 1
        result[2 * pos + 3], result[2 * pos + 4] = 0, reset
        if alts then result[#result + 1] = 0 end   -- served by none
        return result
      end
      cost = 0  -- counted with the edges below: nothing for the commit

    elseif kind == 'b' then
      local raw = call('GET', KEYS[i])
      local tokens = a
      if raw then
        if #raw ~= 16 then return bad(i, 'not a token bucket') end
        local held, at = unpack('<dd', raw)
        if not (finite(held) and finite(at)) then return bad(i, 'not a token bucket') end
        tokens = min(a, held + (now - at) * b / 1e6)
      end
      local deadline = (shadow or shared) and 0 or max_wait
      if tokens >= cost then
        writes[i] = {tokens, shared}
        tokens = tokens - cost
      elseif cost > a then
        wait = -1  -- more than the bucket ever holds: no wait makes it pass
      else
        wait = (cost - tokens) / b * 1e6 + 1
        -- Its slot, exactly: no µs of margin that would pile up along a queue of waiters.
        local slot_at = wait - 1
        if ceil(slot_at - 0.001) <= deadline then
          future, before[i] = slot_at, tokens
          wait, writes[i] = 0, {tokens}
          tokens = tokens - cost
        end
      end
      remaining = tokens
      reset = (a - tokens) / b * 1e6

    elseif kind == 'w' or kind == 'W' then
      local raw = call('GET', KEYS[i])
      local slot = b / 60
      local cur = floor(now / slot)
      local last, total, w, ring, tail   -- tail: waiters' charges ahead of the ring, or nil
      if raw then
        last, total, w, ring, tail = read_window(raw, kind)
        if not last then return bad(i, 'not a sliding window') end
      end
      local e = max(cur, last or cur)   -- the ring's newest slot: this request's earliest
      if raw and e - last >= SLOTS then raw = nil end
      if raw then
        -- Slots last+1..e reuse the ring positions of slots that have left the window; a
        -- waiter's charge whose slot has come moves from the tail into the ring.
        ring, total = advance(ring, total, last, e, w)
      else
        last, total, w = e, 0, width_for(a)
        ring = rep('\0', SLOTS * w)
      end
      local fmt = FMT[w]
      local ahead, newest, at = 0, last, nil
      if tail then
        local kept = {}
        at = {}
        for _, t in ipairs(tail) do
          if t[1] > e then
            kept[#kept + 1], at[t[1]], ahead = t, t[2], ahead + t[2]
          elseif e - t[1] < SLOTS then
            local k = t[1] % SLOTS
            local held = unpack(fmt, ring, k * w + 1) + t[2]
            if width_for(held) > w then ring, w = rewidth(ring, w, width_for(held)) end
            fmt = FMT[w]
            ring, total = put(ring, k, w, held), total + t[2]
          end
          newest = max(newest, t[1])
        end
        tail = kept[1] and kept or nil
      end
      local deadline = shadow and 0 or max_wait
      -- A charge in slot s counts in every window that ends at s or later. A waiter's charge
      -- ahead stays in the tail: it never moves a later caller's earliest slot, it counts in
      -- the windows that hold it, as any charge does. A request may run in slot s when every
      -- window ending at s or later has room for it (later slots then too: waits stay honest).
      local run = e
      if cost > a then
        wait = -1
      elseif total + ahead + cost > a then
        local used, blocked = total, nil
        for x = e, max(e, newest) + SLOTS - 1 do
          if x > e then
            local gone = x - SLOTS
            if gone <= e then
              used = used - unpack(fmt, ring, (gone % SLOTS) * w + 1)
            elseif at then
              used = used - (at[gone] or 0)
            end
            if at then used = used + (at[x] or 0) end
          end
          if used + cost > a then blocked = x end
        end
        if blocked then run = blocked + 1 end
      end
      if wait == 0 and run > cur then wait = run * slot - now + 1 end
      local far = max(e, newest)
      if wait == 0 or (wait > 0 and wait <= deadline) then
        if wait > 0 then future, before[i] = wait, a - total - ahead end
        reset = (max(run, far) + SLOTS) * slot - now
        if total + ahead + cost == 0 then reset = 0 end  -- an empty window (a look with cost 0)
        -- Charged in the commit, to the slot the request runs in.
        writes[i] = {ring, e, total, slot, w, tail}
        wait = 0
        total = total + cost
      else
        reset = (max(last, newest) + SLOTS) * slot - now
      end
      remaining = a - total - ahead

    elseif kind == 'm' then
      local raw = call('GET', KEYS[i])
      local month, start, stop = month_of(now)
      local total = 0
      if raw then
        if #raw ~= 16 then return bad(i, 'not a month count') end
        local held_month, held = unpack('<dd', raw)
        if not (finite(held_month) and finite(held)) then return bad(i, 'not a month count') end
        -- A count left from another month is a count of 0 in this one.
        if held_month == month then total = held end
      end
      if total + cost <= a then
        total = total + cost
        writes[i] = {pack('<dd', month, total), ceil((stop - now) / 1000) + 1000}
      elseif cost > a then
        wait = -1
      else
        wait = stop - now   -- the 1st of next month, 00:00 UTC: the count starts again
      end
      remaining = a - total
      if total > 0 then reset = stop - now end

    elseif kind == 'c' then
      -- Leases past their TTL are not counted here; the commit sweeps them.
      local held, soonest, stale = nil, nil, true
      if not shadow and a >= 1 and a <= 64 and a % 1 == 0 then
        -- One read of the first a + 8 leases: the live ones up to the limit (more only ever
        -- answer 0 remaining), and whether any past its TTL is there for the commit to sweep.
        local page = call('ZRANGEBYSCORE', KEYS[i], '-inf', '+inf', 'WITHSCORES',
          'LIMIT', 0, a + 8)
        if #page < 2 * (a + 8) then
          held, stale = 0, false
          for k = 2, #page, 2 do
            local at = tonumber(page[k])
            if at > now then
              held = held + 1
              soonest = soonest or min(b, at - now)
            else
              stale = true
            end
          end
        end
      end
      if not held then   -- a shadow layer (its exact count shows) or a full page
        local after = string.format('(%.0f', now)
        held = call('ZCOUNT', KEYS[i], after, '+inf')
        local first = call('ZRANGEBYSCORE', KEYS[i], after, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
        soonest = first[2] and min(b, tonumber(first[2]) - now)
      end
      local lease = ARGV[base + 4]
      cost = 0
      if lease ~= '-' then
        if held < a then
          cost = 1
          held = held + 1
          writes[i] = {lease, now + b, stale}
        else
          -- A slot frees as soon as one of the caller's requests in flight finishes; the
          -- store only knows the latest moment: the soonest lease running out its TTL.
          wait = max(1000000, soonest or 0)
        end
      end
      remaining = a - held
      if soonest then reset = soonest end

    elseif kind == 'p' then
      local p = call('HMGET', KEYS[i], 'until', 'rl', 'rr', 'tl', 'tr')
      local hold, rl, rr, tl, tr = pace(p[1]), pace(p[2]), pace(p[3]), pace(p[4]), pace(p[5])
      if hold and hold > now then wait = hold - now end
      if rl and rr and rr > now and rl < 1 then wait = max(wait, rr - now) end
      if tl and tr and tr > now and tl < cost then wait = max(wait, tr - now) end
      remaining, reset = rl or 0, max(0, (rr or now) - now)
      if cost > 0 and wait == 0 and ((rl and rr and rr > now) or (tl and tr and tr > now)) then
        writes[i] = {rl, tl, cost}
        cost = 1
      else
        cost = 0
      end
      if wait > 0 and not shadow and wait <= max_wait then
        -- The provider's own window reopens by then; nothing of ours to charge ahead.
        future, wait = wait, 0
      end
    end

    local over = false
    if shadow and wait ~= 0 then
      -- It would refuse: the request passes it, uncounted, as an enforcing refusal would
      -- leave it; the remaining below 0 tells the caller.
      remaining = min(remaining - cost, -1)
      over, wait, cost, writes[i] = true, 0, 0, nil
    end
    if wait < 0 then
      worst_wait, worst_layer = -1, pos
    elseif wait > 0 and worst_wait >= 0 and wait > worst_wait then
      worst_wait, worst_layer = wait, pos
    end
    if future > longest then longest = future end
    if wait == 0 then costs[i] = cost end
    if over then
      result[2 * pos + 3] = floor(remaining)
    elseif before[i] then
      result[2 * pos + 3] = 0
    else
      result[2 * pos + 3] = max(0, floor(remaining))
    end
    result[2 * pos + 4] = max(0, ceil(reset))
    if alts and j == 0 and fixed[i] then
      if wait ~= 0 then fixed_refused = true end
      if future > fixed_longest then fixed_longest = future end
    end
  end

  if worst_layer == 0 then break end
  if j == 0 then
    -- Refused: nothing is charged; layers that would have passed report what they still hold.
    local fall = alts and not fixed_refused
    if fall then asked = {values(result)} end
    result[1], result[2], result[3] = 0, worst_layer, ceil(worst_wait)
    for i, cost in pairs(costs) do
      local kind = kinds[i]
      if before[i] then
        result[3 + 2 * i] = max(0, floor(before[i]))
      elseif kind == 'b' or kind == 'w' or kind == 'W' or kind == 'c' or kind == 'm' then
        result[3 + 2 * i] = result[3 + 2 * i] + cost
      end
    end
    if not fall then
      count_edges()
      if alts then result[#result + 1] = 0 end
      return result
    end
    refused, soonest = result, worst_wait
  elseif soonest < 0 or (worst_wait >= 0 and worst_wait < soonest) then
    soonest = worst_wait   -- the soonest of the waits (-1: never on that alternative)
  end
  j = j + 1
  if j > #alts then
    -- Every alternative refused: the asked model's answer, with the soonest wait.
    count_edges()
    refused[3] = ceil(soonest)
    refused[#refused + 1] = 0
    return refused
  end
  -- Alternative j: its layers beside the fixed ones' answers; nothing of the last pass's.
  local common = alts.shared
  for _, i in ipairs(variant) do writes[i], costs[i], before[i] = nil, nil, nil end
  result = {}
  for k = 1, 4 + 2 * common do result[k] = asked[k] end
  worst_wait, worst_layer, longest = 0, 0, fixed_longest
  order = {}
  for _, o in ipairs(alts[j][2]) do order[#order + 1] = {o[1], o[1], o[2]} end
  for k = 0, alts[j][1] - 1 do order[#order + 1] = {alts[j][3] + k, common + 1 + k} end
end
local served = j

-- Every key was read and found sound: from here on nothing can fail halfway.
count_edges()

-- Admitted: it runs `delay` µs from now, and its bucket and windows are charged as then.
local delay = 0
if longest > 0 then delay = ceil(longest - 0.001) end  -- float dust is not a µs
result[3] = delay
for i = 1, #KEYS do
  local w = writes[i]
  if w and costs[i] and costs[i] > 0 then
    local kind = kinds[i]
    local base = (i - 1) * 4
    if kind == 'b' then
      local a, b = tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
      -- The level at its run time, told as of now: below 0 while waiters queue (their
      -- debt: later callers wait behind it, and a waiter's refund pays it back). A shared
      -- bucket gives what it holds now, never more: no one sharing it waits on a waiter.
      local tokens = w[1] - costs[i]
      if not w[2] then
        tokens = min(a, w[1] + delay * b / 1e6) - costs[i] - delay * b / 1e6
      end
      -- Past the time to refill, a fresh bucket says the same: let the key go.
      call('SET', KEYS[i], pack('<dd', tokens, now),
        'PX', ceil((a - tokens) / b * 1000) + 1000)
    elseif kind == 'w' or kind == 'W' then
      local ring, e, total, slot, n, tail = w[1], w[2], w[3], w[4], w[5], w[6]
      local cost = costs[i]
      local r = max(e, floor((now + delay) / slot))
      if r == e then total = total + cost end
      -- As wide as the limit and the total need: a changed limit re-encodes the ring once.
      local w2 = width_for(max(tonumber(ARGV[(i - 1) * 4 + 2]), total))
      if w2 ~= n then ring, n = rewidth(ring, n, w2) end
      local state
      if r == e then
        local off = (e % SLOTS) * n
        local held = unpack(FMT[n], ring, off + 1) + cost
        if cost % 1 ~= 0 and n ~= 8 then ring, n = rewidth(ring, n, 8) end
        off = (e % SLOTS) * n
        -- One new string: head, the ring with its slot's counter replaced.
        state = pack(HEAD_FMT[n], n, e, total) .. sub(ring, 1, off)
          .. pack(FMT[n], held) .. sub(ring, off + n + 1)
      else
        state = pack(HEAD_FMT[n], n, e, total) .. ring
      end
      -- A waiter's charge goes in the tail, in slot order; the ring stays at e.
      local far, put_in = e, r == e
      for k = 1, tail and #tail or 0 do
        local at, held = tail[k][1], tail[k][2]
        if not put_in and at >= r then
          put_in = true
          if at == r then held = held + cost
          else state = state .. pack('<dd', r, cost) end
        end
        state, far = state .. pack('<dd', at, held), at
      end
      if not put_in then state, far = state .. pack('<dd', r, cost), r end
      call('SET', KEYS[i], state, 'PX', ceil(((far + SLOTS) * slot - now) / 1000) + 1000)
    elseif kind == 'c' then
      if w[3] then call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now) end
      call('ZADD', KEYS[i], w[2], w[1])
      call('PEXPIRE', KEYS[i], ceil(tonumber(ARGV[(i - 1) * 4 + 3]) / 1000) + 1000)
    elseif kind == 'p' then
      -- Values, not HINCRBY: the increment of a checked number cannot fail.
      if w[1] then call('HSET', KEYS[i], 'rl', w[1] - 1) end
      if w[2] and w[3] > 0 then call('HSET', KEYS[i], 'tl', w[2] - w[3]) end
    else
      call('SET', KEYS[i], w[1], 'PX', w[2])
    end
  end
end
if alts then result[#result + 1] = served end
return result
