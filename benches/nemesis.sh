#!/usr/bin/env bash
# Nemesis (issue #20): 3 etcd and 3 tokend members share a refresh_token account against
# the rotating, reuse-detecting fake IdP while a seeded nemesis pauses, kills and restarts
# members, sets one member's clock, stops and kills etcd members and cuts members off;
# every member's token file is read every 100 ms. Prints the refresh tokens sent twice
# (exit 1 unless 0), provider requests per token lifetime, and each member's share of
# reads that found a valid token. Needs etcd, etcdctl and faketime (scripts/test installs
# them). Builds tokend in the bench profile (release) and runs benches/nemesis.rs.
#   benches/nemesis.sh --seed N --minutes M [--lifetime SECONDS] [--bin PATH]
set -euo pipefail
cd "$(dirname -- "${BASH_SOURCE[0]}")/.."
exec cargo bench --quiet --bench nemesis -- "$@"
