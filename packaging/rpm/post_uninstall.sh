# tokend %postun: after an upgrade ($1 >= 1) restart tokend if it is running, so the
# new binary serves (as Fedora's %systemd_postun_with_restart does). After erase, the
# tokend user and /var/lib/tokend stay, as is usual for rpm packages.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        systemctl try-restart tokend.service >/dev/null 2>&1 || :
    fi
fi
exit 0
