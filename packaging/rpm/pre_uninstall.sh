# tokend %preun: on erase ($1 = 0), not on upgrade, stop and disable tokend
# (as Fedora's %systemd_preun does).
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
    systemctl --no-reload disable --now tokend.service >/dev/null 2>&1 || :
fi
exit 0
