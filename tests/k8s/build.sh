#!/usr/bin/env bash
# tests/k8s/build.sh: builds the real Kubernetes programs the integration tests run
# (kube-apiserver, kubectl, and the etcd that Kubernetes release is tested with) from the
# Go module proxy, with the go command only: the module next to this script
# (tests/k8s/go.mod, go.sum) requires k8s.io/kubernetes and go.etcd.io/etcd/server/v3 and
# pins every k8s.io staging module; its go.sum pins every byte.
#
#   tests/k8s/build.sh          build into ${TOKEND_CACHE:-.cache}/k8s/<k8s version>/bin
#   tests/k8s/build.sh bindir   print that directory and build nothing
#
# A second run costs nothing: when bin/ holds all three programs and its stamp matches
# go.mod, go.sum and the build flags, the script exits at once. Go's module cache and
# build cache live under the same cache directory (k8s/gomod, k8s/gocache), so a CI cache
# of ${TOKEND_CACHE:-.cache} keeps them; bin/ alone (about 200 MB) is enough to skip the
# build. A cold build downloads about 200 MB of modules and compiles for about 13 minutes
# of CPU time (7 to 18 minutes of wall time on 2 cores): tests/k8s/NOTES.md has the
# measurements. Needs Go 1.26 or newer (go.mod's go line); builds run under nice.
set -euo pipefail

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

# The version strings `kube-apiserver --version`, /version and kubectl report (what
# Kubernetes' own hack/lib/version.sh sets); without them both say v0.0.0-master.
minor=${k8s_version#v1.}
minor=${minor%%.*}
ldflags="-s -w"
for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean"
done
flags=(-trimpath "-ldflags=$ldflags")

stamp=$( (cat "$here/go.mod" "$here/go.sum"; echo "${flags[*]}") | sha256sum | cut -d' ' -f1)
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

if ! command -v go >/dev/null; then
    echo "tests/k8s/build.sh: no go command (Go 1.26 or newer is needed)" >&2
    exit 1
fi
export GOMODCACHE=$cache/k8s/gomod
export GOCACHE=$cache/k8s/gocache
# go.sum is complete: nothing may change it, and the build uses exactly what it pins.
export GOFLAGS="-mod=readonly -buildvcs=false"
export CGO_ENABLED=0
mkdir -p "$GOMODCACHE" "$GOCACHE"

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
"$bin/etcd" --version | head -1
