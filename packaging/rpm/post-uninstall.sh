# %systemd_postun_with_restart: reload units; after an upgrade restart the service.
if [ -x /usr/bin/systemctl ]; then
    /usr/bin/systemctl daemon-reload >/dev/null 2>&1 || :
    if [ $1 -ge 1 ]; then
        /usr/bin/systemctl try-restart ralph-qchat.service >/dev/null 2>&1 || :
    fi
fi
exit 0
