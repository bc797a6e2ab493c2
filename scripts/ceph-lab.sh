#!/usr/bin/env bash
# A one-node Ceph cluster with a RADOS Gateway (S3) on loopback, for tests and trials.
#
#   scripts/ceph-lab.sh up   [DIR]   start mon + osd (memstore, in RAM) + radosgw
#   scripts/ceph-lab.sh down [DIR]   stop them (by pid) and remove DIR's state
#   scripts/ceph-lab.sh env  [DIR]   print the endpoint and credentials as shell exports
#
# DIR defaults to $SNAPFERRY_CEPH_DIR or .lab/ceph. Ports: $SNAPFERRY_CEPH_MON_PORT
# (default 36789) and $SNAPFERRY_CEPH_RGW_PORT (default 37480); a second cluster on other
# ports and in another DIR runs beside the first. Every daemon runs in its own session
# and is reaped by the pid recorded in DIR. Nothing listens beyond 127.0.0.1.
#
# Needs Debian's radosgw ceph-mon ceph-osd ceph-common (scripts/setup.sh installs them).
# No authentication (auth ... = none) and one replica: a lab, never a real cluster.
set -euo pipefail

action=${1:-}
dir=${2:-${SNAPFERRY_CEPH_DIR:-.lab/ceph}}
mon_port=${SNAPFERRY_CEPH_MON_PORT:-36789}
rgw_port=${SNAPFERRY_CEPH_RGW_PORT:-37480}
access_key=snapferrylab
secret_key=snapferrylabsecret

die() { echo "ceph-lab: $*" >&2; exit 1; }

conf() { echo "$dir/ceph.conf"; }

ceph_() { ceph --conf "$(conf)" --connect-timeout 10 "$@"; }

start_daemon() {  # name, command...: in its own session, pid to DIR/name.pid
    local name=$1; shift
    setsid "$@" >"$dir/$name.log" 2>&1 < /dev/null &
    echo $! >"$dir/$name.pid"
}

stop() {
    [[ -d $dir ]] || return 0
    local f pid
    for f in "$dir"/rgw.pid "$dir"/osd.pid "$dir"/mon.pid; do
        [[ -f $f ]] || continue
        pid=$(cat "$f")
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        rm -f "$f"
    done
}

up() {
    for b in ceph-mon ceph-osd radosgw radosgw-admin monmaptool ceph; do
        command -v "$b" >/dev/null || die "$b not found (run scripts/setup.sh)"
    done
    stop
    rm -rf "$dir"
    mkdir -p "$dir/mon" "$dir/osd" "$dir/run" "$dir/rgw"
    dir=$(cd "$dir" && pwd)
    local fsid
    fsid=$(cat /proc/sys/kernel/random/uuid)
    cat >"$(conf)" <<EOF
[global]
fsid = $fsid
mon host = v2:127.0.0.1:$mon_port
public addr = 127.0.0.1
auth cluster required = none
auth service required = none
auth client required = none
ms mon client mode = crc
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon allow pool delete = true
osd crush chooseleaf type = 0
osd objectstore = memstore
memstore device bytes = 4294967296
paxos propose interval = 0.01
paxos min wait = 0.01
mon warn on pool no redundancy = false
# the OSD keeps its data in memory (memstore): a host disk under 5 % free (Ceph's
# default floor, which makes the monitor refuse to start) does not matter to this lab
mon data avail crit = 1
mon data avail warn = 2
run dir = $dir/run
admin socket = $dir/run/\$name.asok
log file = $dir/\$name.log
pid file =
[mon.a]
mon data = $dir/mon
[osd.0]
osd data = $dir/osd
osd journal = $dir/osd/journal
[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:$rgw_port
rgw data = $dir/rgw
rgw dns name = 127.0.0.1
rgw thread pool size = 64
EOF
    monmaptool --create --clobber --fsid "$fsid" --addv a "[v2:127.0.0.1:$mon_port]" \
        "$dir/monmap" >/dev/null
    ceph-mon --conf "$(conf)" --mkfs -i a --monmap "$dir/monmap" >/dev/null
    start_daemon mon ceph-mon --conf "$(conf)" -f -i a
    local uuid
    uuid=$(cat /proc/sys/kernel/random/uuid)
    ceph_ osd new "$uuid" 0 >/dev/null
    ceph-osd --conf "$(conf)" -i 0 --mkfs --osd-uuid "$uuid" >/dev/null 2>&1
    start_daemon osd ceph-osd --conf "$(conf)" -f -i 0
    start_daemon rgw radosgw --conf "$(conf)" -n client.rgw.a -f
    local ok=""
    for _ in $(seq 300); do
        if radosgw-admin --conf "$(conf)" -n client.rgw.a user info --uid=snapferry \
            >/dev/null 2>&1 || radosgw-admin --conf "$(conf)" -n client.rgw.a user create \
            --uid=snapferry --display-name=snapferry --access-key=$access_key \
            --secret-key=$secret_key >/dev/null 2>&1; then
            if (exec 3<>/dev/tcp/127.0.0.1/"$rgw_port") 2>/dev/null; then ok=1; break; fi
        fi
        for d in mon osd rgw; do
            kill -0 "$(cat "$dir/$d.pid")" 2>/dev/null || {
                tail -5 "$dir/$d.log" >&2; stop; die "$d exited while starting"; }
        done
        sleep 0.1
    done
    [[ -n $ok ]] || { stop; die "radosgw did not answer on 127.0.0.1:$rgw_port in 30 s"; }
    env_
}

env_() {
    echo "export SNAPFERRY_S3_ENDPOINT=http://127.0.0.1:$rgw_port"
    echo "export AWS_ACCESS_KEY_ID=$access_key"
    echo "export AWS_SECRET_ACCESS_KEY=$secret_key"
    echo "export AWS_DEFAULT_REGION=default"
}

case $action in
    up) up ;;
    down) stop; rm -rf "$dir" ;;
    env) env_ ;;
    *) die "usage: $0 up|down|env [DIR]" ;;
esac
