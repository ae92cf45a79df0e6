#!/usr/bin/env bash
# Benchmark of GET /v1/tokens/{account}/raw over the daemon's Unix socket: requests/s
# and p50/p99 latency, keep-alive and one connection per request, 1 and 4 clients.
# Builds tokend in the bench profile (release) and runs benches/socket.rs; the numbers
# and this command go into BENCHMARKS.md. Extra arguments go to the benchmark
# (e.g. --seconds 10).
set -euo pipefail
cd "$(dirname -- "${BASH_SOURCE[0]}")/.."
exec cargo bench --quiet --bench socket -- "$@"
