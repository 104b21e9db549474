# Create the service's system user and group (idempotent).
getent group ralph-qchat >/dev/null || groupadd --system ralph-qchat
getent passwd ralph-qchat >/dev/null || \
    useradd --system --gid ralph-qchat --home-dir /var/lib/ralph-qchat \
        --no-create-home --shell /sbin/nologin --comment "ralph-qchat daemon" ralph-qchat
exit 0
