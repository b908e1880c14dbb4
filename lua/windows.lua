-- Shared by acquire.lua and settle.lua (limiting/stores/scripts.py puts it in place of their
-- "--#include windows" line): a sliding window's value as acquire.lua's WINDOW STATE
-- describes it, read, re-encoded and written one counter at a time.

local SLOTS = 61          -- 60 whole slots plus the current partial one
local values = unpack     -- Lua's: a list's items (struct's unpack takes the name below)
local pack, unpack = struct.pack, struct.unpack
local sub, rep, byte, huge = string.sub, string.rep, string.byte, math.huge
-- A window's counters n bytes wide, and its head (width byte, newest slot, total) for n.
local FMT = {'<I1', '<I2', '<I3', '<I4', '<I5', '<I6', nil, '<d'}
local HEAD_FMT = {'<BdI1', '<BdI2', '<BdI3', '<BdI4', '<BdI5', '<BdI6', nil, '<Bdd'}

local function finite(x)
  return x ~= nil and x == x and x > -huge and x < huge
end

-- The narrowest counter that holds x exactly: an unsigned integer of 1 to 6 bytes, else a
-- double.
local function width_for(x)
  if x % 1 ~= 0 or x >= 281474976710656 then return 8 end
  if x < 256 then return 1 elseif x < 65536 then return 2 elseif x < 16777216 then return 3
  elseif x < 4294967296 then return 4 elseif x < 1099511627776 then return 5 end
  return 6
end

-- A window's value read: its newest slot, total, counters' width, the 61 counters (a
-- string) and its tail ({slot, count} in slot order; nil: none); nil when it is not one.
local function read_window(raw, kind)
  local n, w, last, total, ring_end, step, tail_fmt = #raw
  if n % 2 == 1 then
    w = byte(raw, 1)
    if not FMT[w] then return nil end
    ring_end, step, tail_fmt = 9 + w + SLOTS * w, 16, '<dd'
    if n < ring_end then return nil end
    last, total = unpack('<d', raw, 2), unpack(FMT[w], raw, 10)
  else
    w = kind == 'W' and 8 or 4   -- the layout before: counts of 4 bytes ("w") or doubles
    ring_end, step, tail_fmt = 16 + SLOTS * w, 8 + w, '<d' .. sub(FMT[w], 2)
    if n < ring_end then return nil end
    last, total = unpack('<dd', raw)
  end
  if (n - ring_end) % step ~= 0 or not (finite(last) and finite(total)) then return nil end
  local tail, prev = nil, last
  for off = ring_end, n - 1, step do
    local at, held = unpack(tail_fmt, raw, off + 1)
    if not (finite(at) and finite(held) and at > prev) then return nil end
    tail = tail or {}
    tail[#tail + 1], prev = {at, held}, at
  end
  return last, total, w, sub(raw, ring_end - SLOTS * w + 1, ring_end), tail
end

-- The ring's counters re-encoded w2 bytes wide (its limit or total needs another width); a
-- count that is not a whole number keeps doubles.
local function rewidth(ring, w, w2)
  local fmt, counts = FMT[w], {}
  for k = 1, SLOTS do
    counts[k] = unpack(fmt, ring, (k - 1) * w + 1)
    if counts[k] % 1 ~= 0 then w2 = 8 end
  end
  return pack('<' .. rep(sub(FMT[w2], 2), SLOTS), values(counts)), w2
end

-- Counter k of a ring of width w set to x.
local function put(ring, k, w, x)
  local off = k * w
  return sub(ring, 1, off) .. pack(FMT[w], x) .. sub(ring, off + w + 1)
end
