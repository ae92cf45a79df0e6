#!/usr/bin/env bash
# Installs the pinned oidc-provider (package.json, package-lock.json here) once into
# ${TOKEND_CACHE:-REPO/.cache}/oidc-provider with `npm ci`, as scripts/oauth-server
# caches its Python venv, and prints that directory (its node_modules is what
# server.mjs loads). Reinstalls when package-lock.json or the node version changes.
# Needs node and npm (scripts/test installs Debian's nodejs and npm when node is missing).
set -euo pipefail

here=$(cd -P -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd -P -- "$here/../.." && pwd)
cache=${TOKEND_CACHE:-$repo/.cache}
[[ "$cache" == /* ]] || cache="$PWD/$cache"
dir="$cache/oidc-provider"

die() { echo "oidc-provider install: $*" >&2; exit 1; }

command -v node >/dev/null || die "node is not installed (apt-get install nodejs npm; scripts/test does it)"
command -v npm >/dev/null || die "npm is not installed (apt-get install npm; scripts/test does it)"

want="$(sha256sum "$here/package-lock.json" | cut -d' ' -f1) $(node --version)"
installed() { [[ -f "$dir/.installed" && "$(cat "$dir/.installed")" == "$want" ]]; }

if ! installed; then
    mkdir -p "$cache"
    # Serialise concurrent installs (tests that start servers in parallel).
    exec 9>"$cache/oidc-provider.lock"
    flock 9
    if ! installed; then
        echo "oidc-provider install: npm ci into $dir (one-time) ..." >&2
        rm -rf "$dir"
        mkdir -p "$dir"
        cp "$here/package.json" "$here/package-lock.json" "$dir/"
        (cd "$dir" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error) >&2 \
            || { rm -rf "$dir"; die "npm ci failed"; }
        echo "$want" >"$dir/.installed"
    fi
    flock -u 9
    exec 9>&-
fi
echo "$dir"
