#!/usr/bin/env bash
# tests/k8s/apiserver.sh: a real Kubernetes API server for tests, on loopback only.
#
#   tests/k8s/apiserver.sh start DIR [KUBE-APISERVER-FLAG...]
#   tests/k8s/apiserver.sh stop DIR [--remove]
#
# `start` runs etcd (built by tests/k8s/build.sh; the release Kubernetes is tested with)
# and kube-apiserver (the same build) on free ports of 127.0.0.1, waits until /readyz
# answers ok (bounded: KUBE_START_TIMEOUT seconds, default 180; it polls, and stops at
# once with the log's tail when a process dies), and leaves in DIR:
#   admin.kubeconfig   cluster-admin (group system:masters, by a static token)
#   admin.token        that token
#   ca.crt             the CA of the serving certificate (self-signed, made with openssl)
#   server             the API server's URL, https://127.0.0.1:PORT
#   sa.key, sa.pub     the service-account signing key pair (TokenRequest works:
#                      `kubectl create token SA`); the issuer is the server's URL
#   pids               "PID NAME" lines of what `stop` ends
#   etcd.log, kube-apiserver.log, audit.log (with KUBE_AUDIT=1)
# Authorization is Node,RBAC. Anything after DIR goes to kube-apiserver as is.
#
# Environment:
#   KUBE_AUTHENTICATION_CONFIG=FILE  --authentication-config=FILE: a structured
#       AuthenticationConfiguration (apiserver.config.k8s.io/v1) that later tests can use to
#       add a JWT issuer; the API server re-reads the file when it changes. The static admin
#       token and service-account tokens keep working beside it.
#   KUBE_AUDIT=1        an audit log (level Metadata for every request) in DIR/audit.log
#   KUBE_OWNER_PID=PID  a watchdog runs `stop DIR` when process PID is gone (a test binary
#       whose servers must not outlive it, even when it is killed); with
#       KUBE_OWNER_REMOVE_DIR=1 it also removes DIR (a test binary's shared instance)
#   K8S_BIN=DIR         kube-apiserver, kubectl and etcd from DIR, not build.sh's bindir
#
# `stop` ends the processes listed in DIR/pids (each only if its command line names DIR:
# a pid reused since is left alone): SIGTERM, then SIGKILL after a bounded wait; with
# --remove it then removes DIR.
# Needs openssl, curl and python3 (for free ports).
set -euo pipefail

here=$(cd -P -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
self=$here/$(basename -- "${BASH_SOURCE[0]}")
prog="tests/k8s/apiserver.sh"

die() {
    echo "$prog: $*" >&2
    exit 1
}

usage() {
    die "usage: $prog start DIR [KUBE-APISERVER-FLAG...] | stop DIR [--remove]"
}

# Whether PID is a live process (not gone, not a zombie) whose command line names DIR
# (as an argument, or a path under it).
ours() {
    local pid=$1 dir=$2 state cmd
    [[ -r /proc/$pid/stat ]] || return 1
    state=$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1) || return 1
    [[ $state != Z && $state != X ]] || return 1
    cmd=" $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) "
    [[ $cmd == *" $dir "* || $cmd == *"$dir/"* ]]
}

stop() {
    local dir=$1 pid name deadline
    [[ -f $dir/pids ]] || return 0
    # Newest first, one after the other: the watchdog, then kube-apiserver (whose graceful
    # shutdown wants etcd still there), then etcd.
    while read -r pid name; do
        # The watchdog runs this very function (`exec apiserver.sh stop`): not itself.
        [[ $pid != "$$" ]] && ours "$pid" "$dir" || continue
        # Each was started in a session of its own: end its whole process group.
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
        deadline=$((SECONDS + 15))
        while ours "$pid" "$dir" && ((SECONDS < deadline)); do
            sleep 0.1
        done
        if ours "$pid" "$dir"; then
            echo "$prog: $name (pid $pid) did not end within 15 s of SIGTERM: SIGKILL" >&2
            kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
        fi
    done < <(tac "$dir/pids")
    rm -f "$dir/pids"
}

# N free loopback ports, distinct (all bound at once, then released for the servers).
free_ports() {
    python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# Seconds since T0 (date +%s%N), as 1.234.
secs_since() {
    local ms=$((($(date +%s%N) - $1) / 1000000))
    printf '%d.%03d' $((ms / 1000)) $((ms % 1000))
}

# Prints the last lines of a log, for an error message.
tail_of() {
    echo "--- last lines of $1 ---" >&2
    tail -n 30 "$1" >&2 || true
}

ssl() {
    openssl "$@" 2>>"$dir/openssl.log" || {
        tail_of "$dir/openssl.log"
        die "openssl $1 failed"
    }
}

make_certs() {
    ssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 7 \
        -subj "/CN=tokend-test-kubernetes-ca" -keyout "$dir/ca.key" -out "$dir/ca.crt"
    printf '%s\n' \
        "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc" \
        "extendedKeyUsage=serverAuth" "keyUsage=critical,digitalSignature" >"$dir/apiserver.ext"
    ssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=kube-apiserver" \
        -keyout "$dir/apiserver.key" -out "$dir/apiserver.csr"
    ssl x509 -req -in "$dir/apiserver.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
        -CAcreateserial -days 7 -extfile "$dir/apiserver.ext" -out "$dir/apiserver.crt"
    ssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$dir/sa.key"
    ssl pkey -in "$dir/sa.key" -pubout -out "$dir/sa.pub"
    chmod 600 "$dir"/*.key
}

# Starts "$@" in a session of its own, output to LOG, and records "PID NAME" in pids.
launch() {
    local name=$1 log=$2
    shift 2
    setsid "$@" </dev/null >>"$log" 2>&1 &
    echo "$! $name" >>"$dir/pids"
    echo "$!"
}

# Polls until `curl ARGS` succeeds; fails when PID dies or after TIMEOUT seconds.
wait_for() {
    local what=$1 pid=$2 log=$3 timeout=$4
    shift 4
    local deadline=$((SECONDS + timeout))
    until curl -sf -m 2 -o /dev/null "$@"; do
        if ! ours "$pid" "$dir"; then
            tail_of "$log"
            return 2
        fi
        if ((SECONDS >= deadline)); then
            tail_of "$log"
            echo "$prog: $what did not become ready within $timeout s" >&2
            return 1
        fi
        sleep 0.1
    done
}

start() {
    local port_etcd port_peer port_api url token t0 pid rc attempt
    for tool in openssl curl python3; do
        command -v "$tool" >/dev/null || die "needs $tool (apt-get install $tool)"
    done
    local bin=${K8S_BIN:-$("$here/build.sh" bindir)}
    for p in kube-apiserver kubectl etcd; do
        [[ -x $bin/$p ]] || die "no $bin/$p: run tests/k8s/build.sh first"
    done
    [[ ! -e $dir/pids ]] || die "$dir/pids exists: stop DIR first"
    mkdir -p "$dir"
    dir=$(cd -P -- "$dir" && pwd)
    local timeout=${KUBE_START_TIMEOUT:-180}
    t0=$(date +%s%N)
    rm -f "$dir/pids" "$dir/admin.kubeconfig" "$dir/server"
    make_certs
    local t_certs
    t_certs=$(secs_since "$t0")

    # etcd: a single member, data thrown away with DIR (so no fsync).
    for attempt in 1 2 3; do
        read -r port_etcd port_peer < <(free_ports 2)
        rm -rf "$dir/etcd"
        pid=$(launch etcd "$dir/etcd.log" "$bin/etcd" --name default --data-dir "$dir/etcd" \
            --listen-client-urls "http://127.0.0.1:$port_etcd" \
            --advertise-client-urls "http://127.0.0.1:$port_etcd" \
            --listen-peer-urls "http://127.0.0.1:$port_peer" \
            --initial-advertise-peer-urls "http://127.0.0.1:$port_peer" \
            --initial-cluster "default=http://127.0.0.1:$port_peer" \
            --unsafe-no-fsync --log-level warn)
        rc=0
        wait_for etcd "$pid" "$dir/etcd.log" "$timeout" "http://127.0.0.1:$port_etcd/health" || rc=$?
        ((rc == 0)) && break
        # A port taken between choosing and binding it: choose again.
        if ((rc == 2 && attempt < 3)) && grep -q 'address already in use' "$dir/etcd.log"; then
            continue
        fi
        stop "$dir"
        die "etcd did not start (log: $dir/etcd.log)"
    done
    local t_etcd
    t_etcd=$(secs_since "$t0")

    token=$(openssl rand -hex 32)
    echo "$token" >"$dir/admin.token"
    echo "$token,tokend-test-admin,tokend-test-admin,system:masters" >"$dir/tokens.csv"
    chmod 600 "$dir/admin.token" "$dir/tokens.csv"
    local -a extra=()
    if [[ -n ${KUBE_AUTHENTICATION_CONFIG-} ]]; then
        [[ -r $KUBE_AUTHENTICATION_CONFIG ]] || die "KUBE_AUTHENTICATION_CONFIG: cannot read $KUBE_AUTHENTICATION_CONFIG"
        extra+=("--authentication-config=$KUBE_AUTHENTICATION_CONFIG")
    fi
    if [[ ${KUBE_AUDIT-} == 1 ]]; then
        printf '%s\n' 'apiVersion: audit.k8s.io/v1' 'kind: Policy' 'rules:' '  - level: Metadata' \
            >"$dir/audit-policy.yaml"
        extra+=("--audit-policy-file=$dir/audit-policy.yaml" "--audit-log-path=$dir/audit.log")
    fi
    extra+=("$@")

    for attempt in 1 2 3; do
        read -r port_api < <(free_ports 1)
        url=https://127.0.0.1:$port_api
        : >"$dir/kube-apiserver.log"
        pid=$(launch kube-apiserver "$dir/kube-apiserver.log" "$bin/kube-apiserver" \
            --etcd-servers "http://127.0.0.1:$port_etcd" \
            --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$port_api" \
            --endpoint-reconciler-type none \
            --tls-cert-file "$dir/apiserver.crt" --tls-private-key-file "$dir/apiserver.key" \
            --cert-dir "$dir/certs" \
            --token-auth-file "$dir/tokens.csv" \
            --service-account-issuer "$url" \
            --service-account-key-file "$dir/sa.pub" \
            --service-account-signing-key-file "$dir/sa.key" \
            --authorization-mode Node,RBAC \
            --service-cluster-ip-range 10.0.0.0/24 \
            --profiling=false \
            "${extra[@]}")
        rc=0
        wait_for kube-apiserver "$pid" "$dir/kube-apiserver.log" "$timeout" \
            --cacert "$dir/ca.crt" -H "Authorization: Bearer $token" "$url/readyz" || rc=$?
        ((rc == 0)) && break
        if ((rc == 2 && attempt < 3)) && grep -q 'address already in use' "$dir/kube-apiserver.log"; then
            sed -i '/ kube-apiserver$/d' "$dir/pids"
            continue
        fi
        stop "$dir"
        die "kube-apiserver did not start (log: $dir/kube-apiserver.log)"
    done

    cat >"$dir/admin.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
  - name: tokend-test
    cluster:
      server: $url
      certificate-authority-data: $(base64 -w0 "$dir/ca.crt")
users:
  - name: tokend-test-admin
    user:
      token: $token
contexts:
  - name: tokend-test-admin
    context:
      cluster: tokend-test
      user: tokend-test-admin
      namespace: default
current-context: tokend-test-admin
EOF
    chmod 600 "$dir/admin.kubeconfig"
    echo "$url" >"$dir/server"

    if [[ -n ${KUBE_OWNER_PID-} ]]; then
        launch watchdog /dev/null bash -c \
            'tail --pid="$1" -f /dev/null; exec bash "$2" stop "$3" $4' watchdog \
            "$KUBE_OWNER_PID" "$self" "$dir" "$([[ ${KUBE_OWNER_REMOVE_DIR-} == 1 ]] && echo --remove)" \
            >/dev/null
    fi
    echo "$prog: kube-apiserver $url ready $(secs_since "$t0") s after the start" \
        "(certificates and keys made at $t_certs s, etcd on port $port_etcd ready at $t_etcd s)"
}

[[ $# -ge 2 ]] || usage
cmd=$1
dir=$2
shift 2
# The processes' command lines name DIR as an absolute path.
if [[ -d $dir ]]; then
    dir=$(cd -P -- "$dir" && pwd)
fi
case $cmd in
start) start "$@" ;;
stop)
    stop "$dir"
    if [[ ${1-} == --remove ]]; then
        rm -rf -- "$dir"
    fi
    ;;
*) usage ;;
esac
