# tokend %post: creates the token directory and makes systemd see the unit. Like the
# .deb, it neither enables nor starts tokend (no `systemctl preset`): the shipped config
# has placeholder credentials, and wrong passwords sent to a real provider can lock its
# service account. Configure, run `tokend check`, then `systemctl enable --now tokend`.

# Where config.example.toml puts secret files: readable by tokend, not by others.
if [ ! -e /etc/tokend/secrets ]; then
    install -d -m 0750 -o root -g tokend /etc/tokend/secrets
fi
if [ -d /run/systemd/system ]; then
    systemd-tmpfiles --create tokend.conf >/dev/null 2>&1 || :
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
exit 0
