# tokend %pre: the tokend user and group must exist before rpm installs
# /etc/tokend/config.toml with group tokend. The files are not on disk yet, so the
# line of systemd/sysusers.d/tokend.conf is given on standard input (as Fedora's
# %sysusers_create_compat does); tests/packaging.sh checks that the two agree.
if command -v systemd-sysusers >/dev/null 2>&1; then
    echo 'u tokend - "OAuth2 token daemon" /var/lib/tokend -' |
        systemd-sysusers --replace=/usr/lib/sysusers.d/tokend.conf -
else
    getent group tokend >/dev/null || groupadd --system tokend
    getent passwd tokend >/dev/null ||
        useradd --system --gid tokend --home-dir /var/lib/tokend --no-create-home \
            --shell /sbin/nologin --comment "OAuth2 token daemon" tokend
fi
exit 0
