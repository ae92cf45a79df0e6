# tokend %postun: after an upgrade ($1 >= 1) restart tokend if it is running, so the
# new binary serves (as Fedora's %systemd_postun_with_restart does). After erase
# ($1 = 0) the tokend user, /var/lib/tokend and any secret files stay, as is usual for
# rpm packages; /etc/tokend/secrets and /etc/tokend go when empty.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        systemctl try-restart tokend.service >/dev/null 2>&1 || :
    fi
fi
if [ "$1" -eq 0 ]; then
    rmdir /etc/tokend/secrets /etc/tokend 2>/dev/null || :
    # The link %post made, if it is still ours.
    if [ "$(readlink /usr/bin/docker-credential-tokend 2>/dev/null)" = tokend ]; then
        rm -f /usr/bin/docker-credential-tokend
    fi
fi
exit 0
