-- wrk script: POST /chat with a JSON body whose user_id rotates round-robin over
-- BENCH_USERS ids, split across wrk's threads; counts responses by status and
-- prints one "BENCH_JSON {...}" line at the end for bench/__main__.py to read.
local nusers = tonumber(os.getenv("BENCH_USERS") or "1000")
local nthreads = tonumber(os.getenv("BENCH_THREADS") or "1")
local model = os.getenv("BENCH_MODEL") or ""
local path = os.getenv("BENCH_PATH") or "/chat"

local model_part = ""
if model ~= "" then
  model_part = string.format(',"model":"%s"', model)
end
local headers = { ["Content-Type"] = "application/json" }
-- BENCH_KEY: every request presents this API key (and names no user_id: the key's user pays).
local key = os.getenv("BENCH_KEY") or ""
if key ~= "" then
  headers["Authorization"] = "Bearer " .. key
end

local threads = {}
local next_id = 0

function setup(thread)
  thread:set("tid", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

tid = 0
local counter = 0
statuses = {}
samples = {}  -- status -> first body seen, for non-2xx only

function request()
  counter = counter + 1
  local user = (counter * nthreads + tid) % nusers
  local body
  if key ~= "" then
    body = string.format('{"message":"hello %d"%s}', counter, model_part)
  else
    body = string.format('{"message":"hello %d","user_id":"bench-user-%d"%s}', counter, user, model_part)
  end
  return wrk.format("POST", path, headers, body)
end

function response(status, hdrs, body)
  statuses[status] = (statuses[status] or 0) + 1
  if status >= 300 and samples[status] == nil then
    samples[status] = string.sub(body or "", 1, 200)
  end
end

local function json_string(s)
  return '"' .. string.gsub(s, '[%c"\\\128-\255]', function(c)
    return string.format("\\u%04x", string.byte(c))
  end) .. '"'
end

function done(summary, latency, requests)
  local by_status = {}
  local sample = {}
  for _, thread in ipairs(threads) do
    local counts = thread:get("statuses")
    if counts then
      for code, n in pairs(counts) do
        by_status[code] = (by_status[code] or 0) + n
      end
    end
    local bodies = thread:get("samples")
    if bodies then
      for code, body in pairs(bodies) do
        sample[code] = sample[code] or body
      end
    end
  end
  local parts = {}
  for code, n in pairs(by_status) do
    table.insert(parts, string.format('"%d":%d', code, n))
  end
  local sample_parts = {}
  for code, body in pairs(sample) do
    table.insert(sample_parts, string.format('"%d":%s', code, json_string(body)))
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"duration_us":%d,"requests":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"mean":%f,"max":%d},"statuses":{%s},' ..
    '"samples":{%s}}\n',
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max, table.concat(parts, ","), table.concat(sample_parts, ",")))
end
