#!/usr/bin/env bash
# Scale benchmark (issue #11): `tokend run` with N accounts against a local constant
# token endpoint; prints first-token time, RSS, idle CPU, `tokend check` time and the
# cost of a one-account reload, for each N given (default 10 1000 10000), 3 runs each.
# Builds tokend in the bench profile (release) and runs benches/scale.rs; the numbers
# and this command go into BENCHMARKS.md. Extra arguments go to the benchmark
# (e.g. --runs 5, --idle 60, --bin PATH to measure another build).
set -euo pipefail
cd "$(dirname -- "${BASH_SOURCE[0]}")/.."
exec cargo bench --quiet --bench scale -- "$@"
