# The shell harness of the script tests (tests/packaging.sh, tests/service.sh,
# tests/ops.sh): counted checks that print `ok`/`FAIL` lines and end with the line
# "N passed, M failed", bounded waits on a state, and the rule that what cannot run
# here is a skip on a workstation but a failure where CI is set (a check that skips
# there is no check). Sourced, not run; the sourcing script sets `started=$SECONDS`
# and calls `summary` from its EXIT trap.
# shellcheck shell=bash

passed=0
failed=0

ok() { passed=$((passed + 1)); printf 'ok   %s\n' "$1"; }

# not_ok WHAT [DETAILS]: a failure; the details' last 40 lines, indented.
not_ok() {
    failed=$((failed + 1))
    printf 'FAIL %s\n' "$1"
    if [ -n "${2:-}" ]; then printf '%s\n' "$2" | tail -n 40 | sed 's/^/     /'; fi
}

# check WHAT COMMAND...: passes when COMMAND exits 0; shows its output when it does not.
check() {
    local what=$1 out
    shift
    if out=$("$@" 2>&1); then ok "$what"; else not_ok "$what" "$out"; fi
}

# expect WHAT WANT GOT
expect() {
    if [ "$2" = "$3" ]; then ok "$1"; else not_ok "$1" "want: $2"$'\n'"got:  $3"; fi
}

step() { printf '\n== %s (%d s)\n' "$1" $((SECONDS - ${started:-0})); }
skip() { printf 'skip %s\n' "$1"; }
is_root() { [ "$(id -u)" -eq 0 ]; }

# cannot_run WHAT [DETAILS]: a part that cannot run here: a skip, a failure in CI.
cannot_run() {
    if [ -n "${CI:-}" ]; then not_ok "$1" "${2:-}"; else skip "$1"; fi
}

# wait_for SECONDS COMMAND...: polls COMMAND until it succeeds; fails after SECONDS.
wait_for() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then return 1; fi
        sleep 0.1
    done
}

# A free TCP port on 127.0.0.1.
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# The venv in $venv (under $cache) with $requirements installed; made anew when they or python3 changed.
# Fails (leaving no venv) when venv or pip fails.
ensure_venv() {
    local want have=""
    want="$(sha256sum "$requirements" | cut -d' ' -f1) $(python3 -c 'import sys; print(sys.version.split()[0])')"
    if [ -f "$venv/.installed" ]; then have=$(cat "$venv/.installed"); fi
    if [ "$have" = "$want" ]; then return 0; fi
    printf 'installing %s into %s\n' "$requirements" "$venv"
    rm -rf "$venv"
    mkdir -p "$cache"
    if python3 -m venv "$venv" &&
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
            --only-binary=:all: -r "$requirements"; then
        printf '%s\n' "$want" >"$venv/.installed"
    else
        rm -rf "$venv"
        return 1
    fi
}

# summary NAME STATUS: from the EXIT trap: a script that stopped early (STATUS non-zero
# with no failure counted) is a failure; prints the time and the closing line, and
# exits 1 when anything failed.
summary() {
    if [ "$2" -ne 0 ] && [ "$failed" -eq 0 ]; then
        not_ok "$1 stopped early (exit status $2)"
    fi
    printf '\ntook %d s\n' $((SECONDS - ${started:-0}))
    printf '%d passed, %d failed\n' "$passed" "$failed"
    if [ "$failed" -ne 0 ]; then exit 1; fi
}
