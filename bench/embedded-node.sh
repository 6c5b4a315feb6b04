#!/usr/bin/env bash
# Verifications/s and p50/p99 of one embedded node at 32 connections, and the same
# server's GET /v2/liveness rate in the same run (the HTTP ceiling of the machine).
# Usage: bench/embedded-node.sh [seconds]   (needs wrk and a release build)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
dir=$(mktemp -d); port=7391
export CG_ROOT=bench-root-$$
CREDITGATE_ROOT_KEY=$CG_ROOT CREDITGATE_LOG=${CREDITGATE_LOG:-warn} target/release/creditgate serve \
  --data-dir "$dir" --listen 127.0.0.1:$port & pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 50); do curl -sf 127.0.0.1:$port/v2/liveness >/dev/null && break; sleep 0.1; done
H=(-H "Content-Type: application/json" -H "Authorization: Bearer $CG_ROOT")
api=$(curl -s "${H[@]}" 127.0.0.1:$port/v2/apis.createApi -d '{"name":"bench"}' | sed 's/.*"apiId":"\([^"]*\)".*/\1/')
export CG_KEY=$(curl -s "${H[@]}" 127.0.0.1:$port/v2/keys.createKey \
  -d "{\"apiId\":\"$api\",\"credits\":{\"remaining\":1000000000000}}" | sed 's/.*"key":"\([^"]*\)".*/\1/')
echo "== keys.verifyKey, one hot key, 32 connections, ${secs}s"
wrk -t2 -c32 -d${secs}s --latency -s bench/verify.lua http://127.0.0.1:$port/v2/keys.verifyKey | grep -E "Requests/sec|50%|75%|90%|99%|Non-2xx|p50_ms"
echo "== GET /v2/liveness, 32 connections, ${secs}s"
wrk -t2 -c32 -d${secs}s --latency http://127.0.0.1:$port/v2/liveness | grep -E "Requests/sec|50%|99%|Non-2xx"
sleep 3
echo "== analytics after the run (rows written / dropped)"
curl -s 127.0.0.1:$port/metrics | grep -E "^creditgate_analytics_(written|dropped)_total" || true
