#!/usr/bin/env bash
# The soak run (not in CI): 3 nodes on Redis + Postgres + ClickHouse at a fixed rate on
# 1,000 keys for 30 min, sampling memory, sockets and queue depths every 10 s; writes
# target/soak/{report.md,soak.csv,soak.svg}. Run it with nothing else on the machine.
# Knobs: SOAK_SECS (1800) RATE (1000) KEYS (1000) SAMPLE_SECS (10).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -q
exec python3 bench/soak.py "$@"
