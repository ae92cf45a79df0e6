# tokend %post: creates the token and state directories and makes systemd see the unit. Like the
# .deb, it neither enables nor starts tokend (no `systemctl preset`): the shipped config
# has placeholder credentials, and wrong passwords sent to a real provider can lock its
# service account. Configure, run `tokend check`, then `systemctl enable --now tokend`.

# Where config.example.toml puts secret files: readable by tokend, not by others.
if [ ! -e /etc/tokend/secrets ]; then
    install -d -m 0750 -o root -g tokend /etc/tokend/secrets
fi
# /run/tokend/tokens and /var/lib/tokend, owned by tokend (tmpfiles.d/tokend.conf).
if command -v systemd-tmpfiles >/dev/null 2>&1; then
    systemd-tmpfiles --create tokend.conf >/dev/null 2>&1 || :
else
    install -d -m 0755 -o tokend -g tokend /run/tokend /run/tokend/tokens
    install -d -m 0700 -o tokend -g tokend /var/lib/tokend
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
# The container tools' credential helper is tokend called by another name (credHelpers
# "tokend" runs docker-credential-tokend). cargo-generate-rpm packages no symbolic links,
# so the link is made here (and removed by %postun on erase); a file of that name that
# is not a link is left alone.
if [ ! -e /usr/bin/docker-credential-tokend ] || [ -L /usr/bin/docker-credential-tokend ]; then
    ln -sfn tokend /usr/bin/docker-credential-tokend
fi
exit 0
