#!/usr/bin/env bash
# The two deployment paths run for real: the .deb under a real systemd, and the container
# image under podman.
#
#   bash tests/service.sh          (as root; scripts/test runs it after tests/packaging.sh)
#
# systemd: boots a Debian 12 root file system (debootstrap --variant=minbase plus systemd,
# cached in ${TOKEND_CACHE:-.cache}/service/) with systemd-nspawn, installs the .deb built
# from this checkout and checks it as an operator would, against the local OAuth2 server
# (scripts/oauth-server on 127.0.0.1; the machine shares the host's network): start with a
# LoadCredential= secret and WatchdogSec=, READY, STATUS in `systemctl status`, reload,
# a reader user in the outputs' group reads the raw, header and directory outputs (and
# the directories have the modes of SPEC §3 under UMask=0077), `tokend status` and `tokend
# get` over the socket, the journal fields, a restart that asks the provider nothing,
# stop.
# Container: builds the image from packaging/container/Containerfile (base image made
# locally from a debootstrap minbase, imported as debian:bookworm-slim; the binary built
# here, copied in with BINARY_STAGE=prebuilt: no registry is needed) and runs it with a
# read-only root, as uid 10001, all capabilities dropped: `once` as the init step, then
# `run`, the token directory on a volume that a second container reads while the token
# rotates. Then `podman kube play` of packaging/kubernetes/tokend-sidecar.yaml, rewritten
# where podman lacks a part (printed as it runs).
#
# Installs what it lacks with apt-get: debootstrap, systemd-container, podman, runc, catatonit.
# podman runs with --runtime runc (crun refuses cgroup v1/v2 hybrids) and explicit ulimits.
# Where nspawn or podman cannot run (not root, no tools), the part is skipped with the
# reason; with CI set, that is a failure instead. Stops the machine and removes the
# containers and volumes it made, also on failure. The last line is "N passed, M failed";
# the exit status is 1 when anything failed.
# The single-quoted sh -c programs expand their own arguments:
# shellcheck disable=SC2016
set -euo pipefail

cd "$(dirname "$0")/.."
repo=$PWD
started=$SECONDS
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

cache=${TOKEND_CACHE:-$PWD/.cache}
[[ $cache == /* ]] || cache=$PWD/$cache
work=$(mktemp -d)
oauth=$work/oauth
nspawn_pid=""
leader=""          # the host's pid of the machine's systemd
image=localhost/tokend:service-test
prefix=tokend-service-test
kube=""            # the rewritten Kubernetes example, while it is played

# shellcheck source=tests/lib.sh
. tests/lib.sh

in_machine() {
    timeout 60 nsenter -t "$leader" -a -- /usr/bin/env -i \
        PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"
}
pm() { timeout 180 podman --runtime runc "$@"; }
# Containers started by `podman kube play` take their ulimits from here: runc cannot
# raise them past this machine's hard limits.
export CONTAINERS_CONF=$work/containers.conf
cat >"$CONTAINERS_CONF" <<'EOF'
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
EOF

stop_machine() {
    [ -n "$nspawn_pid" ] || return 0
    # SIGTERM makes nspawn halt the machine cleanly; SIGKILL if that takes too long.
    kill -TERM "$nspawn_pid" 2>/dev/null
    if ! timeout 30 tail --pid="$nspawn_pid" -f /dev/null; then
        kill -KILL "$nspawn_pid" 2>/dev/null
        timeout 10 tail --pid="$nspawn_pid" -f /dev/null
    fi
    nspawn_pid=""
}
remove_containers() {
    command -v podman >/dev/null || return 0
    if [ -n "$kube" ]; then pm kube down "$kube" >/dev/null 2>&1; fi
    local c v p
    for p in $(podman pod ps --format '{{.Name}}' | grep "^$prefix" || true); do
        pm pod rm -f -t 2 "$p" >/dev/null 2>&1
    done
    for c in $(podman ps -a --format '{{.Names}}' | grep "^$prefix" || true); do
        pm rm -f -t 2 "$c" >/dev/null 2>&1
    done
    for v in $(podman volume ls --format '{{.Name}}' | grep "^$prefix" || true); do
        pm volume rm -f "$v" >/dev/null 2>&1
    done
}

finish() {
    local status=$?
    set +e
    stop_machine
    remove_containers
    if [ -f "$oauth/server.pid" ]; then scripts/oauth-server stop --dir "$oauth" >/dev/null 2>&1; fi
    rm -rf "$work"
    summary tests/service.sh "$status"
}
trap finish EXIT

if [ "$(id -u)" -ne 0 ]; then
    cannot_run "systemd and container tests (need root: systemd-nspawn, rootful podman)"
    exit 0
fi

# ---------------------------------------------------------------------------------------
step "tools"
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
# The pause process of a pod (podman kube play builds its pause image from it locally).
command -v catatonit >/dev/null || need+=(catatonit)
if ((${#need[@]})); then
    t0=$SECONDS
    # uidmap, fuse-overlayfs, slirp4netns: what podman recommends; the build's RUN needs
    # a network (containernetworking-plugins, a dependency).
    if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "${need[@]}" uidmap fuse-overlayfs slirp4netns >"$work/apt.log" 2>&1; then
        printf 'installed %s in %d s\n' "${need[*]}" $((SECONDS - t0))
    else
        cannot_run "installing ${need[*]} (apt-get failed)" "$(cat "$work/apt.log")"
        exit 0
    fi
fi
export PATH="$PATH:$cache/packaging-venv/bin"
if ! command -v cargo-deb >/dev/null; then
    not_ok "cargo-deb is missing: tests/packaging.sh installs it; run that first"
    exit 1
fi
systemd-nspawn --version | sed -n 1p
podman --version

# ---------------------------------------------------------------------------------------
step "build: the release binary, the .deb, the root file systems"
target=$(cargo metadata --no-deps --format-version 1 |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
cargo build --release --locked --quiet
# The man pages and completions the .deb takes from target/release/dist/.
cargo xtask dist "$target/release/dist" >/dev/null
bin=$target/release/tokend
cargo deb --no-build --output "$work/deb/" >/dev/null
deb=$(echo "$work"/deb/*.deb)

# make_rootfs DIR [PACKAGES]: a Debian 12 minbase in DIR (cached; made once, in DIR.tmp
# first, so that an interrupted debootstrap leaves no half tree behind).
make_rootfs() {
    local dir=$1 include=${2:-}
    if [ -f "$dir/.complete" ]; then return 0; fi
    rm -rf "$dir.tmp"
    mkdir -p "$(dirname "$dir")"
    timeout 900 debootstrap --variant=minbase ${include:+--include="$include"} bookworm \
        "$dir.tmp" >"$dir.log" 2>&1 || { tail -n 20 "$dir.log"; return 1; }
    chroot "$dir.tmp" apt-get clean
    rm -rf "$dir.tmp"/var/lib/apt/lists/*
    touch "$dir.tmp/.complete"
    rm -rf "$dir"
    mv "$dir.tmp" "$dir"
}
rootfs=$cache/service/bookworm-systemd
basefs=$cache/service/bookworm-minbase
t0=$SECONDS
# The two in parallel: mostly waiting for the mirror.
make_rootfs "$rootfs" systemd,systemd-sysv,dbus >"$work/rootfs.out" 2>&1 &
rootfs_job=$!
make_rootfs "$basefs" >"$work/basefs.out" 2>&1 &
basefs_job=$!
rootfs_ok=1 basefs_ok=1
wait "$rootfs_job" || rootfs_ok=0
wait "$basefs_job" || basefs_ok=0
printf 'root file systems ready in %d s\n' $((SECONDS - t0))

# 10 minutes: longer than the Kubernetes example's `once --min-valid 5m`.
scripts/oauth-server start --dir "$oauth" --lifetime 600 >"$work/oauth.env"
# shellcheck disable=SC1091
. "$work/oauth.env"
tokens_asked() { grep -c 'POST /o/token/' "$oauth/server.log" || true; }

# ---------------------------------------------------------------------------------------
step "systemd: boot Debian 12 under systemd-nspawn, install the .deb"
machine_ok=0
if [ "$rootfs_ok" -eq 0 ]; then
    cannot_run "systemd tests (debootstrap failed)" "$(cat "$work/rootfs.out")"
else
    root=$work/machine
    cp -a "$rootfs" "$root"
    cp "$deb" "$root/root/tokend.deb"
    systemd-nspawn -D "$root" --register=no --keep-unit --machine=tokend-test -b \
        </dev/null >"$work/nspawn.log" 2>&1 &
    nspawn_pid=$!
    find_leader() {
        local p
        for p in $(ps -o pid= --ppid "$nspawn_pid"); do
            if [ "$(cat "/proc/$p/comm" 2>/dev/null)" = systemd ]; then
                leader=$p
                return 0
            fi
        done
        return 1
    }
    t0=$SECONDS
    # systemd is found as soon as it runs, before its bus socket exists (systemctl then
    # fails at once, "Failed to connect to bus", rather than waiting).
    if wait_for 30 find_leader && find_leader &&
        wait_for 60 nsenter -t "$leader" -a test -S /run/systemd/private &&
        state=$(timeout 120 nsenter -t "$leader" -a systemctl is-system-running --wait); then
        printf 'booted in %d s: %s\n' $((SECONDS - t0)) "$state"
        machine_ok=1
    else
        cannot_run "systemd tests (the machine did not boot)" "$(tail -n 20 "$work/nspawn.log")"
    fi
fi

if [ "$machine_ok" -eq 1 ]; then
    check "the machine's boot finished without failed units" \
        bash -c 'test -z "$(nsenter -t "$1" -a systemctl --failed --no-legend)"' _ "$leader"
    check "dpkg -i the .deb built from this checkout" in_machine dpkg -i /root/tokend.deb
    check "procps (/bin/kill) is not installed: reload must not need it" \
        in_machine sh -c '! test -e /bin/kill'
    in_machine groupadd --system readers
    in_machine useradd --system --no-create-home --gid readers reader
    in_machine useradd --system --no-create-home outsider
    # The secret is root's alone: tokend gets it as a systemd credential.
    printf '%s' "$CC_CLIENT_SECRET" >"$root/etc/tokend/secrets/svc-secret"
    in_machine chmod 0600 /etc/tokend/secrets/svc-secret
    cat >"$root/etc/tokend/config.toml" <<EOF
[daemon]
socket = "/run/tokend/tokend.sock"
socket_mode = "0666"
state_dir = "/var/lib/tokend"

[[account]]
name = "svc"
token_url = "$TOKEN_URL"
client_id = "$CC_CLIENT_ID"
client_secret = { credential = "svc-secret" }
scope = "full"

[account.access]
users = ["reader"]

[[account.output]]
path = "/run/tokend/tokens/svc"
format = "raw"
mode = "0640"
group = "readers"

[[account.output]]
path = "/run/tokend/tokens/svc.header"
format = "header"
mode = "0640"
group = "readers"

[[account.output]]
path = "/run/tokend/tokens/svc.d"
format = "directory"
mode = "0640"
group = "readers"

# For everyone, in a directory tokend makes: both get search bits despite UMask=0077.
[[account.output]]
path = "/run/tokend/tokens/public/svc.d"
format = "directory"
mode = "0644"
EOF
    mkdir -p "$root/etc/systemd/system/tokend.service.d"
    cat >"$root/etc/systemd/system/tokend.service.d/test.conf" <<'EOF'
[Service]
LoadCredential=svc-secret:/etc/tokend/secrets/svc-secret
WatchdogSec=3s
SupplementaryGroups=readers
EOF
    in_machine systemctl daemon-reload
    show() { in_machine systemctl show tokend -p "$1" --value; }

    step "systemd: start"
    asked=$(tokens_asked)
    t0=$SECONDS
    check "systemctl start tokend (returns after READY=1)" in_machine systemctl start tokend
    printf 'started in %d s\n' $((SECONDS - t0))
    expect "active (running)" "active running" "$(show ActiveState) $(show SubState)"
    expect "STATUS= sent: StatusText" "1 account: 1 fresh" "$(show StatusText)"
    check "systemctl status shows the STATUS= line" bash -c \
        'grep -qF "Status: \"1 account: 1 fresh\"" <<<"$1"' _ "$(in_machine systemctl status --no-pager tokend || true)"
    expect "one token request" $((asked + 1)) "$(tokens_asked)"
    check "the secret is root's only: tokend cannot read the file, it got the credential" \
        in_machine runuser -u tokend -- sh -c '! cat /etc/tokend/secrets/svc-secret'
    main_pid=$(show MainPID)
    watchdog_at=$(show WatchdogTimestampMonotonic)

    step "systemd: the outputs, as a reader in their group"
    token=$(in_machine tokend get svc || true)
    check "tokend get svc (root, over the socket) prints a token" test -n "$token"
    as_reader() { in_machine runuser -u "$1" -- cat "$2" 2>&1 || true; }
    expect "reader reads the raw output" "$token" "$(as_reader reader /run/tokend/tokens/svc)"
    expect "reader reads the header output" "Authorization: Bearer $token" \
        "$(as_reader reader /run/tokend/tokens/svc.header)"
    expect "reader reads the directory output's raw" "$token" \
        "$(as_reader reader /run/tokend/tokens/svc.d/raw)"
    expect "reader reads the directory output's header through ..data" \
        "Authorization: Bearer $token" "$(as_reader reader /run/tokend/tokens/svc.d/..data/header)"
    check "outsider (not in readers) cannot read the raw output" \
        in_machine runuser -u outsider -- sh -c '! cat /run/tokend/tokens/svc'
    expect "outsider reads the 0644 directory output in a directory tokend made" "$token" \
        "$(as_reader outsider /run/tokend/tokens/public/svc.d/raw)"
    modes=$(in_machine stat -c '%n %a %U:%G' /run/tokend/tokens/svc /run/tokend/tokens/svc.d \
        /run/tokend/tokens/svc.d/..data/ /run/tokend/tokens/public /run/tokend/tokens/public/svc.d)
    expect "modes and groups under UMask=0077 (SPEC §3)" "\
/run/tokend/tokens/svc 640 tokend:readers
/run/tokend/tokens/svc.d 750 tokend:readers
/run/tokend/tokens/svc.d/..data/ 750 tokend:readers
/run/tokend/tokens/public 755 tokend:tokend
/run/tokend/tokens/public/svc.d 755 tokend:tokend" "$modes"
    expect "reader: tokend get svc (access users = [\"reader\"])" "$token" \
        "$(in_machine runuser -u reader -- tokend get svc 2>&1 || true)"
    check "tokend status over the socket lists svc as fresh" bash -c \
        'grep -Eq "^svc +fresh" <<<"$1" || { echo "$1"; false; }' _ "$(in_machine tokend status 2>&1 || true)"

    step "systemd: journal, reload, watchdog"
    journal_has_fields() {
        in_machine journalctl -u tokend -o json --no-pager ACCOUNT=svc | python3 -c '
import json, sys
for line in sys.stdin:
    e = json.loads(line)
    if e.get("ACCOUNT") == "svc" and "STATUS" in e and "EXPIRES_IN" in e:
        sys.exit(0)
sys.exit(1)'
    }
    check "the journal has ACCOUNT=, STATUS= and EXPIRES_IN= fields" wait_for 10 journal_has_fields
    # The config's generation, as `tokend status` shows it (GET /v1/daemon).
    generation() { in_machine tokend status 2>/dev/null | sed -n 's/.*(generation \([0-9]*\),.*/\1/p'; }
    before=$(generation)
    check "systemctl reload tokend" in_machine systemctl reload tokend
    reloaded() { [ -n "$before" ] && [ "$(generation)" -gt "$before" ]; }
    check "tokend status shows the reloaded config's generation" wait_for 10 reloaded
    expect "still active, same main pid, after the reload" "active $main_pid" "$(show ActiveState) $(show MainPID)"
    watchdog_moved() { [ "$(show WatchdogTimestampMonotonic)" != "$watchdog_at" ]; }
    check "WATCHDOG=1 keeps coming (WatchdogSec=3s)" wait_for 10 watchdog_moved
    # Long enough that a missing ping would have made systemd kill and restart it.
    since() { echo $(($(date +%s) - $(date -d "$(show ActiveEnterTimestamp)" +%s))); }
    long_enough() { [ "$(since)" -ge 7 ]; }
    wait_for 15 long_enough || true
    expect "no watchdog restart after $(since) s: same main pid, NRestarts=0" "$main_pid 0" \
        "$(show MainPID) $(show NRestarts)"

    step "systemd: restart, stop"
    asked=$(tokens_asked)
    check "systemctl restart tokend" in_machine systemctl restart tokend
    expect "the restarted tokend serves the saved token" "$token" "$(in_machine tokend get svc 2>&1 || true)"
    expect "the restart asked the provider nothing" "$asked" "$(tokens_asked)"
    t0=$(date +%s%N)
    check "systemctl stop tokend" in_machine systemctl stop tokend
    stop_ms=$((($(date +%s%N) - t0) / 1000000))
    printf 'stopped in %d ms\n' "$stop_ms"
    check "stopped within a second ($stop_ms ms)" test "$stop_ms" -lt 1000
    expect "inactive (dead), exit status 0" "inactive 0" "$(show ActiveState) $(show ExecMainStatus)"
    check "the socket file is gone, the token files are kept" \
        in_machine sh -c '! test -e /run/tokend/tokend.sock && test -s /run/tokend/tokens/svc'
    stop_machine
fi

# ---------------------------------------------------------------------------------------
step "container: the image from packaging/container/Containerfile"
image_ok=0
if [ "$basefs_ok" -eq 0 ]; then
    cannot_run "container tests (debootstrap of the base image failed)" "$(cat "$work/basefs.out")"
else
    t0=$SECONDS
    remove_containers
    if ! podman image exists debian:bookworm-slim; then
        # The name the Containerfile uses; no registry is reachable from CI.
        tar --numeric-owner -C "$basefs" --exclude=./.complete -c . |
            pm import --quiet - debian:bookworm-slim >/dev/null
    fi
    # The build context: the recipe and the binary built above, nothing else.
    ctx=$work/context
    mkdir -p "$ctx/target/release" "$ctx/packaging/container"
    cp "$bin" "$ctx/target/release/tokend"
    cp packaging/container/Containerfile "$ctx/packaging/container/"
    if pm build --pull=never --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 \
        --build-arg BINARY_STAGE=prebuilt -f packaging/container/Containerfile \
        -t "$image" "$ctx" >"$work/build.log" 2>&1; then
        ok "podman build (BINARY_STAGE=prebuilt) in $((SECONDS - t0)) s"
        image_ok=1
    else
        not_ok "podman build" "$(cat "$work/build.log")"
    fi
fi

if [ "$image_ok" -eq 1 ]; then
    expect "image: user 10001, entrypoint tokend, command run" \
        '10001:10001 ["/usr/bin/tokend"] ["run"]' \
        "$(podman image inspect --format '{{.Config.User}} {{json .Config.Entrypoint}} {{json .Config.Cmd}}' "$image")"
    etc=$work/etc
    mkdir -p "$etc/secrets"
    printf '%s' "$CC_CLIENT_SECRET" >"$etc/secrets/svc-secret"
    cat >"$etc/config.toml" <<EOF
[daemon]
socket = "/run/tokend/tokend.sock"
state_dir = "/var/lib/tokend"
log_format = "text"

[[account]]
name = "svc"
token_url = "$TOKEN_URL"
client_id = "$CC_CLIENT_ID"
client_secret = { file = "/etc/tokend/secrets/svc-secret" }
scope = "full"
# Rotates every 2 s, for the reader below.
refresh_every = "2s"
min_refresh_interval = "1s"

[[account.output]]
path = "/run/tokend/tokens/svc"
mode = "0640"

[[account.output]]
path = "/run/tokend/tokens/svc.d"
format = "directory"
mode = "0640"
EOF
    # As Kubernetes mounts them (fsGroup 10001, defaultMode 0440).
    chown -R root:10001 "$etc"
    chmod 0750 "$etc" "$etc/secrets"
    chmod 0440 "$etc/config.toml" "$etc/secrets/svc-secret"
    for v in tokens state run; do pm volume create "$prefix-$v" >/dev/null; done
    hardened=(--read-only --cap-drop=all --security-opt=no-new-privileges
        --ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
    # Host network: the OAuth2 server listens on the host's 127.0.0.1.
    tokend_ctr=("${hardened[@]}" --network=host
        -v "$etc:/etc/tokend:ro" -v "$prefix-tokens:/run/tokend/tokens"
        -v "$prefix-state:/var/lib/tokend" -v "$prefix-run:/run/tokend")

    step "container: once, then run, a second container reads the rotating token"
    asked=$(tokens_asked)
    check "tokend once (the init step) exits 0" \
        pm run --rm --name "$prefix-once" "${tokend_ctr[@]}" "$image" once
    expect "once asked the provider once" $((asked + 1)) "$(tokens_asked)"
    check "tokend run starts" pm run -d --name "$prefix-run" "${tokend_ctr[@]}" "$image"
    fresh() { pm exec "$prefix-run" tokend status | grep -Eq '^svc +fresh'; }
    check "tokend status (exec, over the socket) shows svc fresh" wait_for 30 fresh
    proc=$(pm exec "$prefix-run" grep -E '^(Uid|Gid|CapEff|CapBnd|CapAmb|NoNewPrivs):' /proc/1/status | tr -s '\t ' ' ')
    expect "pid 1 is tokend as 10001, no capabilities, no new privileges" "\
Uid: 10001 10001 10001 10001
Gid: 10001 10001 10001 10001
CapEff: 0000000000000000
CapBnd: 0000000000000000
CapAmb: 0000000000000000
NoNewPrivs: 1" "$proc"
    check "the root file system is read-only" \
        pm exec "$prefix-run" sh -c 'touch /usr/bin/x 2>&1 | grep -q "Read-only file system"'
    # The reader: another user whose supplementary group is tokend's (fsGroup), the token
    # volume read-only, no network; prints what it reads every 0.1 s.
    pm run -d --name "$prefix-reader" "${hardened[@]}" --network=none --user 10002:10002 \
        --group-add 10001 -v "$prefix-tokens:/run/tokend/tokens:ro" --entrypoint /bin/sh \
        "$image" -c 'while :; do
            echo "$(cat /run/tokend/tokens/svc) $(cat /run/tokend/tokens/svc.d/..data/raw)"
            sleep 0.1
        done' >/dev/null
    distinct() { pm logs "$prefix-reader" 2>&1 | awk '{ print $1 }' | sort -u | wc -l; }
    rotated() { [ "$(distinct)" -ge 4 ]; }
    check "the reader saw the token rotate (4 tokens)" wait_for 40 rotated
    pm stop -t 0 "$prefix-reader" >/dev/null 2>&1 || true
    reads=$(pm logs "$prefix-reader" 2>&1 || true)
    printf '%d reads, %d tokens\n' "$(wc -l <<<"$reads")" "$(distinct)"
    pm rm -f "$prefix-reader" >/dev/null 2>&1 || true
    check "every read found a whole token, in the file and in the directory output" \
        awk 'NF != 2 || length($1) < 20 || length($2) < 20 { bad++; print } END { exit bad > 0 }' <<<"$reads"
    t0=$(date +%s%N)
    check "podman stop (SIGTERM)" pm stop -t 10 "$prefix-run"
    stop_ms=$((($(date +%s%N) - t0) / 1000000))
    expect "exit status 0, stopped within a second (${stop_ms} ms)" "0 yes" \
        "$(podman inspect --format '{{.State.ExitCode}}' "$prefix-run") $([ "$stop_ms" -lt 1000 ] && echo yes || echo no)"
    pm rm -f "$prefix-run" >/dev/null
fi

# ---------------------------------------------------------------------------------------
step "Kubernetes example: podman kube play packaging/kubernetes/tokend-sidecar.yaml"
if [ "$image_ok" -eq 1 ]; then
    kube=$work/kube.yaml
    metrics_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    # The example as it is, but for what podman does not do or this machine does not have;
    # each such rewrite is printed as "podman: ..." and is not exercised here.
    kube_etc=$work/kube-etc
    python3 - packaging/kubernetes/tokend-sidecar.yaml "$kube" "$image" "$TOKEN_URL" \
        "$CC_CLIENT_ID" "$CC_CLIENT_SECRET" "$metrics_port" "$kube_etc" "$prefix" <<'PY'
import os, re, sys, yaml
src, dst, image, url, client_id, secret, port, etc, prefix = sys.argv[1:]
docs = [d for d in yaml.safe_load_all(open(src)) if d]
kind = {d["kind"]: d for d in docs}
def note(s): print("podman: " + s)

cm = kind["ConfigMap"]["data"]
toml = cm["config.toml"]
toml = re.sub(r'token_url = ".*"', f'token_url = "{url}"', toml)
toml = re.sub(r'client_id = ".*"', f'client_id = "{client_id}"', toml)
toml = re.sub(r'metrics_listen = "0\.0\.0\.0:\d+"', f'metrics_listen = "0.0.0.0:{port}"', toml)
cm["config.toml"] = toml
note("token_url, client_id and the secret point at the local OAuth2 server; metrics_listen on a free port (host network)")
for k in kind["Secret"]["stringData"]:
    kind["Secret"]["stringData"][k] = secret

pod = kind["Deployment"]["spec"]["template"]["spec"]
sidecars = [c for c in pod["initContainers"] if c.get("restartPolicy") == "Always"]
pod["initContainers"] = [c for c in pod["initContainers"] if c not in sidecars]
for c in sidecars:
    del c["restartPolicy"]
    del c["readinessProbe"]
pod["containers"] = sidecars + pod["containers"]
pod["restartPolicy"] = "OnFailure"
note("pod restartPolicy OnFailure: podman 4.3 applies a Deployment's Always to init containers too and reruns tokend-once forever")
note("native sidecar (init container with restartPolicy: Always) run as an ordinary container: podman runs init containers to completion, so ordering sidecar-before-app and restart are not exercised")
note("readinessProbe not played (podman has no readiness); this test asks /v1/health itself, as the kubelet would")
for c in pod["initContainers"] + pod["containers"]:
    if c.pop("ports", None):
        note(f"{c['name']}: no port list (the pod uses the host's network, to reach the OAuth2 server)")
    if c["image"].startswith("tokend:"):
        c["image"] = image
app = pod["containers"][-1]
app["image"] = image
app["command"] = ["/bin/sh", "-c",
                  "while :; do cat /run/tokend/tokens/msk.header; sleep 1; done"]
# podman 4.3 ignores fsGroup: the app gets the group another way.
fs_group = pod["securityContext"]["fsGroup"]
app["securityContext"]["runAsGroup"] = fs_group
note(f"app: runAsGroup {fs_group} (podman ignores fsGroup, which would make it a supplementary group)")
note("the app is the tokend image reading the header file each second (no curl image without a registry)")
# The projected volume: its files, as the kubelet would make them (root:fsGroup, the
# defaultMode), in a hostPath directory.
vols = {v["name"]: v for v in pod["volumes"]}
for name, v in vols.items():
    if "projected" not in v:
        continue
    mode = v["projected"].get("defaultMode", 0o644)
    for source in v["projected"]["sources"]:
        obj = kind["ConfigMap"] if "configMap" in source else kind["Secret"]
        data = obj.get("data") or obj.get("stringData")
        spec = source.get("configMap") or source.get("secret")
        items = spec.get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            path = os.path.join(etc, item["path"])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(data[item["key"]])
            os.chmod(path, mode)
    del v["projected"]
    v["hostPath"] = {"path": etc, "type": "Directory"}
    note(f"volume {name!r}: podman 4.3 plays no projected (nor secret) volumes; the same files "
         "(root:fsGroup, defaultMode) come from a hostPath directory made from the ConfigMap and the Secret")
# Names this test can clean up after: podman makes each emptyDir a named volume.
kind["Deployment"]["metadata"]["name"] = f"{prefix}-example"
for v in pod["volumes"]:
    v["name"] = f"{prefix}-{v['name']}"
for c in pod["initContainers"] + pod["containers"]:
    for m in c.get("volumeMounts", []):
        m["name"] = f"{prefix}-{m['name']}"
note(f"the Deployment and its volumes renamed with the prefix {prefix}- (removed afterwards)")
yaml.safe_dump_all(docs, open(dst, "w"), sort_keys=False)
PY
    fs_group=$(python3 -c 'import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
print(next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["securityContext"]["fsGroup"])' "$kube")
    chown -R "root:$fs_group" "$kube_etc"
    chmod -R g+X "$kube_etc"
    asked=$(tokens_asked)
    out_ok=0
    if out=$(pm kube play --network host --start=true "$kube" 2>&1); then
        ok "podman kube play"
        out_ok=1
    else
        for c in $(podman ps -a --format '{{.Names}}' | grep "^$prefix-example" || true); do
            out+=$'\n'"--- $c: $(podman logs "$c" 2>&1 | tail -n 5)"
        done
        not_ok "podman kube play" "$out"
    fi
    if [ "$out_ok" -eq 1 ]; then
        pod=$(podman pod ps --format '{{.Name}}' | grep "^$prefix-example" | sed -n 1p)
        app_read() { pm logs "$pod-app" 2>&1 | grep -q '^Authorization: Bearer '; }
        if wait_for 30 app_read; then
            ok "the app container reads the header file from the shared emptyDir"
        else
            not_ok "the app container reads the header file from the shared emptyDir" \
                "$(pm logs "$pod-app" 2>&1 | tail -n 5)"
        fi
        kube_fresh() { pm exec "$pod-tokend" tokend status | grep -Eq '^msk +fresh'; }
        check "kubectl exec ... tokend status: msk fresh (as in the example's comment)" wait_for 30 kube_fresh
        expect "tokend-once asked the provider, the sidecar reused its token" \
            $((asked + 1)) "$(tokens_asked)"
        expect "GET /v1/health on metrics_listen (what the readiness probe asks): 200" 200 \
            "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$metrics_port/v1/health" || true)"
        check "podman kube down" pm kube down "$kube"
    fi
fi
