# %systemd_preun: on removal (not upgrade) stop and disable the service.
if [ $1 -eq 0 ] && [ -x /usr/bin/systemctl ]; then
    /usr/bin/systemctl --no-reload disable --now ralph-qchat.service >/dev/null 2>&1 || :
fi
exit 0
