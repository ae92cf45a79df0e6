#!/usr/bin/env bash
# Benchmark of POST /v1/tokens/{account}/dpop over the daemon's Unix socket: proofs/s and
# p50/p99 latency with 1 and 4 clients, beside plain token reads (GET .../raw) in the
# same run. Builds tokend in the bench profile (release) and runs benches/dpop.rs; the
# numbers and this command go into BENCHMARKS.md. Extra arguments go to the benchmark
# (e.g. --seconds 10).
set -euo pipefail
cd "$(dirname -- "${BASH_SOURCE[0]}")/.."
exec cargo bench --quiet --bench dpop -- "$@"
