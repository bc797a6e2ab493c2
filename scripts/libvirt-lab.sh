#!/usr/bin/env bash
# Start or stop a libvirtd for tests and CI on a machine without systemd.
#
#   scripts/libvirt-lab.sh up      # idempotent: returns at once if ours already answers
#   scripts/libvirt-lab.sh down    # stops the libvirtd this script started (by its pid)
#   scripts/libvirt-lab.sh status
#
# "up" (root only) makes the libvirt-qemu user and group libvirtd looks up before it
# reads its config, writes /etc/libvirt/qemu.conf so QEMU runs as root with no security
# driver and no virtlogd (the original file, if any, is kept once as qemu.conf.pre-snapferry
# and put back by "down"), starts libvirtd in its own session with a pid file and waits
# until `virsh -c qemu:///system version` answers (the first start probes QEMU's
# capabilities: about 8 s).
set -euo pipefail

RUN_DIR=${SNAPFERRY_LIBVIRT_RUN:-/run/snapferry-libvirt}
PID_FILE=$RUN_DIR/libvirtd.pid
LOG_FILE=$RUN_DIR/libvirtd.log
CONF=/etc/libvirt/qemu.conf
CONF_BACKUP=/etc/libvirt/qemu.conf.pre-snapferry
MARK="# written by snapferry scripts/libvirt-lab.sh"
URI=qemu:///system
WAIT=${SNAPFERRY_LIBVIRT_WAIT:-90}

die() { echo "libvirt-lab: $*" >&2; exit 1; }

answers() { timeout 10 virsh -c "$URI" version >/dev/null 2>&1; }

our_pid() {
    local pid
    pid=$(cat "$PID_FILE" 2>/dev/null) || return 1
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

write_conf() {
    mkdir -p /etc/libvirt
    if [[ -f $CONF ]] && ! grep -qF "$MARK" "$CONF" && [[ ! -f $CONF_BACKUP ]]; then
        cp -p "$CONF" "$CONF_BACKUP"
    fi
    local want
    want=$(printf '%s\n' "$MARK" 'user = "root"' 'group = "root"' 'dynamic_ownership = 0' \
        'security_driver = "none"' 'stdio_handler = "file"')
    if [[ ! -f $CONF ]] || [[ $(cat "$CONF") != "$want" ]]; then
        printf '%s\n' "$want" >"$CONF"
    fi
}

up() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (libvirtd's qemu:///system)"
    command -v libvirtd >/dev/null || [[ -x /usr/sbin/libvirtd ]] \
        || die "libvirtd not installed (bash scripts/setup.sh installs libvirt-daemon)"
    command -v virsh >/dev/null || die "virsh not installed (libvirt-clients)"
    if our_pid >/dev/null && answers; then
        return 0
    fi
    if ! our_pid >/dev/null && answers; then
        return 0  # a libvirtd started elsewhere (systemd, a developer): use it, never stop it
    fi
    getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
    if ! getent passwd libvirt-qemu >/dev/null; then
        local groups=()
        getent group kvm >/dev/null && groups=(-G kvm)
        useradd --system -g libvirt-qemu "${groups[@]}" -M -d /var/lib/libvirt \
            -s /usr/sbin/nologin libvirt-qemu
    fi
    write_conf
    mkdir -p /var/log/libvirt/qemu /var/lib/libvirt/qemu /var/cache/libvirt/qemu "$RUN_DIR"
    if ! our_pid >/dev/null; then
        rm -f "$PID_FILE"
        local bin
        bin=$(command -v libvirtd || echo /usr/sbin/libvirtd)
        setsid "$bin" --daemon --pid-file "$PID_FILE" </dev/null >>"$LOG_FILE" 2>&1
    fi
    local deadline=$((SECONDS + WAIT))
    until answers; do
        if ((SECONDS > deadline)); then
            die "libvirtd did not answer on $URI within ${WAIT} s (log: $LOG_FILE)"
        fi
        sleep 0.5
    done
}

down() {
    local pid
    if pid=$(our_pid); then
        kill "$pid"
        for _ in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$PID_FILE"
    if [[ -f $CONF ]] && grep -qF "$MARK" "$CONF"; then
        if [[ -f $CONF_BACKUP ]]; then mv "$CONF_BACKUP" "$CONF"; else rm -f "$CONF"; fi
    fi
}

case ${1:-} in
    up) up ;;
    down) down ;;
    status)
        if pid=$(our_pid); then echo "libvirtd running, pid $pid"; else echo "not started here"; fi
        answers && echo "$URI answers" || echo "$URI does not answer"
        ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
