#!/usr/bin/env bash
# Footprint of a running tokend: release binary size, resident memory after a minute
# with 10 accounts, and CPU time used over an idle minute. Runs against the real OAuth2
# server (scripts/oauth-server) with 1-hour tokens, so the minute is idle after the
# first fetches. Usage: benches/footprint.sh [SECONDS]   (default 60)
set -euo pipefail
repo=$(cd -P -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
seconds=${1:-60}
work=$(mktemp -d)
cleanup() {
    [[ -n "${pid:-}" ]] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    scripts/oauth-server stop --dir "$work/srv" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

cargo build --release --quiet
bin=target/release/tokend
eval "$(scripts/oauth-server start --dir "$work/srv" --lifetime 3600)"
printf 'cc-secret\n' >"$work/secret"
{
    for i in $(seq 1 10); do
        cat <<TOML
[[account]]
name = "acct$i"
token_url = "$TOKEN_URL"
client_id = "cc-client"
client_secret = { file = "secret" }
scope = "full"
[[account.output]]
path = "out/acct$i"
[[account.output]]
path = "out/acct$i.json"
format = "json"

TOML
    done
} >"$work/config.toml"

$bin run -c "$work/config.toml" 2>"$work/log" &
pid=$!
# Wait for all ten accounts' first tokens (bounded), then measure an idle minute.
for _ in $(seq 1 100); do
    [[ $(ls "$work/out" 2>/dev/null | wc -l) -ge 20 ]] && break
    sleep 0.1
done
[[ $(ls "$work/out" | wc -l) -ge 20 ]] || { echo "tokens not written:"; cat "$work/log"; exit 1; }
tick=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
before=$(cpu)
sleep "$seconds"
after=$(cpu)
rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
threads=$(awk '/Threads/ {print $2}' "/proc/$pid/status")
size=$(stat -c %s "$bin")
requests=$(grep -c 'token refreshed' "$work/log")
echo "binary size:            $((size / 1024)) KiB ($bin)"
echo "RSS after ${seconds}s:        ${rss} KiB (peak ${hwm} KiB), ${threads} threads"
echo "CPU over idle ${seconds}s:    $(( (after - before) * 1000 / tick )) ms"
echo "token requests:         $requests (10 accounts, 1-hour tokens)"
