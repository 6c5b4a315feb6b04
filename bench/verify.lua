-- wrk script: POST keys.verifyKey with cost 1 for the key in $CG_KEY.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("CG_ROOT")
wrk.body = '{"key":"' .. os.getenv("CG_KEY") .. '","credits":{"cost":1}}'
local errs = 0
response = function(status, headers, body)
  if status ~= 200 or not string.find(body, '"code":"VALID"', 1, true) then errs = errs + 1 end
end
done = function(summary, latency, requests)
  io.write(string.format("p50_ms=%.3f p99_ms=%.3f rps=%.0f\n",
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.requests / (summary.duration / 1e6)))
end
