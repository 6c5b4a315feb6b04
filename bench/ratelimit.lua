-- wrk script: POST /v2/ratelimit.limit over IDENTIFIERS identifiers (default 1,000),
-- limit LIMIT (default 10^9, so checks pass) per 60 s window, bearer ROOT_KEY.
-- done() prints one WRKRESULT line as ../shared/bench/load/verify-file.lua does.
local root = os.getenv("ROOT_KEY") or ""
local n = tonumber(os.getenv("IDENTIFIERS") or "1000")
local limit = tonumber(os.getenv("LIMIT") or "1000000000")
local reqs = {}
local i = 0

function init(args)
  local headers = { ["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. root }
  for k = 1, n do
    local body = string.format(
      '{"namespace":"bench","identifier":"user_%d","limit":%d,"duration":60000}', k, limit)
    reqs[#reqs + 1] = wrk.format("POST", "/v2/ratelimit.limit", headers, body)
  end
  i = math.random(0, #reqs - 1)
end

function request()
  i = i + 1
  if i > #reqs then i = 1 end
  return reqs[i]
end

function done(summary, latency, requests)
  local e = summary.errors
  local secs = summary.duration / 1e6
  io.write(string.format(
    "WRKRESULT requests=%d duration_s=%.3f rps=%.1f p50_ms=%.3f p90_ms=%.3f p99_ms=%.3f max_ms=%.3f connect_err=%d read_err=%d write_err=%d timeout_err=%d non2xx=%d\n",
    summary.requests, secs, summary.requests / secs,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000,
    latency:percentile(99) / 1000, latency.max / 1000,
    e.connect, e.read, e.write, e.timeout, e.status))
end
