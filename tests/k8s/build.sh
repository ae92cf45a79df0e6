#!/usr/bin/env bash
# tests/k8s/build.sh: builds the real Kubernetes programs the integration tests run
# (kube-apiserver, kubectl, and the etcd that Kubernetes release is tested with) from the
# Go module proxy, with the go command only: the module next to this script
# (tests/k8s/go.mod, go.sum) requires k8s.io/kubernetes and go.etcd.io/etcd/server/v3 and
# pins every k8s.io staging module; its go.sum pins every byte.
#
#   tests/k8s/build.sh          build into ${TOKEND_CACHE:-.cache}/k8s/<k8s version>/bin
#   tests/k8s/build.sh bindir   print that directory and build nothing
#   tests/k8s/build.sh pin v1.X.Y [v3.A.B]
#                               rewrite go.mod and go.sum for another Kubernetes release
#                               (and etcd: by default the one its hack/lib/etcd.sh names)
#
# A second run costs nothing: when bin/ holds all three programs and its stamp matches
# go.mod (less comments), go.sum and the build flags, the script exits at once. Go's module cache and
# build cache live under the same cache directory (k8s/gomod, k8s/gocache), so a CI cache
# of ${TOKEND_CACHE:-.cache} keeps them; bin/ alone (245 MB) is enough to skip the build.
# A cold build downloads 92 MB of modules (13 s) and compiles for about 7 minutes of CPU
# time (403 s on an idle machine), 90% of it kube-apiserver: about 3.5 minutes on 2 idle
# cores. The programs are compiled without optimization and inlining (`-N -l`): a third
# less CPU than an optimized build (625 s), for tests that run about as fast (the
# Kubernetes tests 58 s against 56). tests/k8s/NOTES.md has the measurements. Needs Go
# 1.26 or newer (go.mod's go line); the builds run under nice.
set -euo pipefail
# One block, read whole before it runs: editing this file during a build cannot change it.
{

here=$(cd -P -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd -P -- "$here/../.." && pwd)
cache=${TOKEND_CACHE:-$repo/.cache}
mkdir -p "$cache"
cache=$(cd -P -- "$cache" && pwd)

k8s_version=$(awk '$1 == "k8s.io/kubernetes" { print $2; exit }' "$here/go.mod")
etcd_version=$(awk '$1 == "go.etcd.io/etcd/server/v3" { print $2; exit }' "$here/go.mod")
if [[ -z $k8s_version || -z $etcd_version ]]; then
    echo "tests/k8s/build.sh: go.mod names no k8s.io/kubernetes or etcd server version" >&2
    exit 1
fi
bin=$cache/k8s/$k8s_version/bin

if [[ ${1-} == bindir ]]; then
    echo "$bin"
    exit 0
fi

use_go() {
    if ! command -v go >/dev/null; then
        echo "tests/k8s/build.sh: no go command (Go 1.26 or newer is needed)" >&2
        exit 1
    fi
    export GOMODCACHE=$cache/k8s/gomod
    export GOCACHE=$cache/k8s/gocache
    export CGO_ENABLED=0
    mkdir -p "$GOMODCACHE" "$GOCACHE"
}

# k8s.io/kubernetes requires its staging modules (k8s.io/api, k8s.io/apiserver, ...) at
# v0.0.0 and replaces them with directories of its own repository, which a module that
# requires it does not see: each must be pinned to the published v0.MINOR.PATCH instead.
pin() {
    local k=$1 e=${2-} json modfile dir minor
    [[ $k =~ ^v1\.[0-9]+\.[0-9]+$ ]] || { echo "tests/k8s/build.sh pin: not a release: $k" >&2; exit 1; }
    use_go
    export GOFLAGS="-mod=mod -buildvcs=false"
    json=$(go mod download -json "k8s.io/kubernetes@$k")
    modfile=$(sed -n 's/^\t"GoMod": "\(.*\)",$/\1/p' <<<"$json")
    dir=$(sed -n 's/^\t"Dir": "\(.*\)",$/\1/p' <<<"$json")
    [[ -f $modfile && -d $dir ]] || { echo "tests/k8s/build.sh pin: $json" >&2; exit 1; }
    if [[ -z $e ]]; then
        e=v$(sed -n 's/^ETCD_VERSION=${ETCD_VERSION:-\(.*\)}$/\1/p' "$dir/hack/lib/etcd.sh")
    fi
    minor=${k#v1.}
    {
        sed '/^module /,$d' "$here/go.mod"
        echo "module tokend-tests/k8s"
        echo
        grep -m1 '^go ' "$modfile"
        echo
        printf 'require (\n\tgo.etcd.io/etcd/server/v3 %s\n\tk8s.io/kubernetes %s\n)\n\n' "$e" "$k"
        printf 'tool (\n\tgo.etcd.io/etcd/server/v3\n\tk8s.io/kubernetes/cmd/kube-apiserver\n\tk8s.io/kubernetes/cmd/kubectl\n)\n\n'
        echo "replace ("
        sed -n '/^require (/,/^)/p' "$modfile" |
            awk -v v="v0.$minor" '$1 ~ /^k8s\.io\// && $2 == "v0.0.0" { printf "\t%s => %s %s\n", $1, $1, v }'
        echo ")"
    } >"$here/go.mod.new"
    mv "$here/go.mod.new" "$here/go.mod"
    rm -f "$here/go.sum"
    (cd "$here" && go mod tidy)
    echo "tests/k8s/build.sh: go.mod and go.sum now pin Kubernetes $k and etcd $e"
}

if [[ ${1-} == pin ]]; then
    [[ $# -ge 2 ]] || { echo "usage: tests/k8s/build.sh pin v1.X.Y [v3.A.B]" >&2; exit 1; }
    pin "$2" "${3-}"
    exit 0
fi

# The version strings `kube-apiserver --version`, /version and kubectl report (what
# Kubernetes' own hack/lib/version.sh sets); without them both say v0.0.0-master.
minor=${k8s_version#v1.}
minor=${minor%%.*}
ldflags="-s -w"
for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean"
done
# Test servers, built once per CI run: compiled without optimization or inlining (-N -l),
# which takes a third off the build's CPU (tests/k8s/NOTES.md).
flags=(-trimpath "-gcflags=all=-N -l" "-ldflags=$ldflags")

# What the binaries are made of: go.mod without its comments, go.sum, the flags.
stamp=$( (grep -v '^//' "$here/go.mod"; cat "$here/go.sum"; echo "${flags[*]}") | sha256sum | cut -d' ' -f1)
programs=(kube-apiserver kubectl etcd)
have_all() {
    local p
    for p in "${programs[@]}"; do
        [[ -x $bin/$p ]] || return 1
    done
    [[ $(cat "$bin/.stamp" 2>/dev/null) == "$stamp" ]]
}
if have_all; then
    echo "tests/k8s/build.sh: kube-apiserver $k8s_version and etcd $etcd_version are built ($bin)"
    exit 0
fi

use_go
# go.sum is complete: nothing may change it, and the build uses exactly what it pins.
export GOFLAGS="-mod=readonly -buildvcs=false"

echo "tests/k8s/build.sh: building kube-apiserver and kubectl $k8s_version, etcd $etcd_version into $bin"
start=$(date +%s)
cd "$here"
tmp=$cache/k8s/$k8s_version/bin.tmp
rm -rf "$tmp"
mkdir -p "$tmp"
echo "== go mod download"
nice -n 10 go mod download
echo "   $(du -sh "$GOMODCACHE/cache/download" | cut -f1) in the module cache after $(($(date +%s) - start)) s"
echo "== go build kube-apiserver kubectl"
nice -n 10 go build "${flags[@]}" -o "$tmp/" k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl
echo "== go build etcd"
nice -n 10 go build "${flags[@]}" -o "$tmp/etcd" go.etcd.io/etcd/server/v3
echo "$stamp" >"$tmp/.stamp"
rm -rf "$bin"
mv "$tmp" "$bin"
echo "tests/k8s/build.sh: built in $(($(date +%s) - start)) s:"
ls -l "$bin"
"$bin/kube-apiserver" --version
"$bin/etcd" --version | sed -n 1p  # sed reads it all: head could leave etcd a SIGPIPE, which pipefail makes a failure
exit
}
