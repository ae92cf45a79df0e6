#!/usr/bin/env bash
# Wall time of the credential helpers (issue 24; BENCHMARKS.md): `tokend credential
# kubectl` (kubectl runs it on every command: one socket round trip), `tokend get` beside
# it for reference, and the git and container tools' helpers (two round trips: the list,
# then the token). Builds the release binary, starts a constant token endpoint (python3,
# 24-hour tokens of 1,024 characters) and `tokend run` on a socket of its own, then runs
# hyperfine (apt-get install hyperfine): RUNS runs each (default 100) after a warm-up,
# and prints a Markdown table of median, mean, min and max with the load average.
set -euo pipefail
cd "$(dirname -- "${BASH_SOURCE[0]}")/.."
runs=${RUNS:-100}

command -v hyperfine >/dev/null || {
    echo "benches/credential.sh: needs hyperfine (apt-get install hyperfine)" >&2
    exit 1
}
cargo build --release --quiet
target=$(cargo metadata --no-deps --format-version 1 |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
bin=$target/release/tokend
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

python3 - "$work/port" <<'EOF' &
import http.server, json, os, secrets, sys
class Token(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        body = json.dumps({"access_token": secrets.token_hex(512), "token_type": "Bearer",
                           "expires_in": 86400}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", 0), Token)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(server.server_address[1]))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
server.serve_forever()
EOF
pids+=($!)
for _ in $(seq 100); do [[ -s $work/port ]] && break; sleep 0.05; done
port=$(cat "$work/port")
sock=$work/tokend.sock
cat >"$work/config.toml" <<EOF
[daemon]
socket = "$sock"
log_format = "text"
log_level = "warn"

[[account]]
name = "bench"
token_url = "http://127.0.0.1:$port/token"
client_id = "bench"
client_secret = "bench-secret"
urls = ["https://git.example.org/team/", "https://registry.example.org/"]
EOF
chmod 600 "$work/config.toml"
"$bin" run -c "$work/config.toml" 2>"$work/tokend.log" &
pids+=($!)
for _ in $(seq 200); do "$bin" get bench --socket "$sock" >/dev/null 2>&1 && break; sleep 0.05; done
"$bin" get bench --socket "$sock" >/dev/null
printf 'protocol=https\nhost=git.example.org\npath=team/app.git\n\n' >"$work/git.txt"
printf 'registry.example.org\n' >"$work/docker.txt"

echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) CPUs; $("$bin" --version)"
hyperfine --style basic -N --warmup 20 --runs "$runs" --export-json "$work/direct.json" \
    -n "tokend credential kubectl" "$bin credential kubectl bench --socket $sock" \
    -n "tokend get (reference)" "$bin get bench --socket $sock" >/dev/null
# stdin from a file needs a shell; hyperfine subtracts the shell's own start-up.
hyperfine --style basic --shell bash --warmup 20 --runs "$runs" --export-json "$work/stdin.json" \
    -n "tokend credential git get" "$bin credential git --socket $sock get <$work/git.txt" \
    -n "docker-credential-tokend get" "$bin credential docker --socket $sock get <$work/docker.txt" >/dev/null
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$work/direct.json" "$work/stdin.json" <<'EOF'
import json, sys
print("| helper | median | mean | min | max | runs |")
print("|---|---:|---:|---:|---:|---:|")
for path in sys.argv[1:]:
    for r in json.load(open(path))["results"]:
        ms = lambda s: f"{s * 1000:.2f} ms"
        print(f"| {r['command']} | {ms(r['median'])} | {ms(r['mean'])} | {ms(r['min'])} | {ms(r['max'])} | {len(r['times'])} |")
EOF
