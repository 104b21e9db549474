# The agent's home and state; the secrets file readable by the service group.
if [ ! -d /var/lib/ralph-qchat ]; then
    mkdir -p /var/lib/ralph-qchat
    chown ralph-qchat:ralph-qchat /var/lib/ralph-qchat
    chmod 0750 /var/lib/ralph-qchat
fi
chown root:ralph-qchat /etc/sysconfig/ralph-qchat 2>/dev/null || :
chmod 0640 /etc/sysconfig/ralph-qchat 2>/dev/null || :
# %systemd_post: enable according to the preset on first install.
if [ $1 -eq 1 ] && [ -x /usr/bin/systemctl ]; then
    /usr/bin/systemctl daemon-reload >/dev/null 2>&1 || :
    /usr/bin/systemctl preset ralph-qchat.service >/dev/null 2>&1 || :
fi
exit 0
