#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for the slow cluster tests (tests/test_slurm.py).
#
#   scripts/slurm-local.sh start    install slurm-wlm + munge when missing (Debian, as root), write a one-node
#                                   slurm.conf for this machine, start munged, slurmctld and slurmd, and wait
#                                   until sinfo shows the node idle
#   scripts/slurm-local.sh status   the daemons this script started and sinfo
#   scripts/slurm-local.sh stop     stop only the daemons this script started (by their pid files)
#
# Jobs are accounted to a text file (JobCompType=jobcomp/filetxt): `sacct --completion` (alias `sacct -c`) lists
# them; there is no slurmdbd. State, logs and pid files live in $VSS_SLURM_DIR (default /var/tmp/vss-slurm).
set -euo pipefail

STATE=${VSS_SLURM_DIR:-/var/tmp/vss-slurm}
CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
MARK="# written by vss scripts/slurm-local.sh"
STARTED=$STATE/started          # "name pidfile" per daemon this script started
HOST=$(hostname -s)

say() { echo "[slurm-local] $*"; }
die() { echo "[slurm-local] error: $*" >&2; exit 1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else die "needs root for: $*"; fi; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sinfo >/dev/null \
        && command -v munged >/dev/null; then
        return
    fi
    command -v apt-get >/dev/null || die "slurm-wlm and munge are missing and this is not a Debian system (no apt-get)"
    say "installing slurm-wlm and munge (apt-get)"
    local guard=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then  # the packages must not start their daemons: this script starts them
        printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null
        as_root chmod +x /usr/sbin/policy-rc.d
        guard=1
    fi
    as_root apt-get update -qq || true
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge \
        >"$STATE/apt.log" 2>&1 || { tail -20 "$STATE/apt.log" >&2; die "apt-get install slurm-wlm munge failed"; }
    [ -n "$guard" ] && as_root rm -f /usr/sbin/policy-rc.d
    say "installed $(slurmctld -V)"
}

write_conf() {
    if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script; move it away or set SLURM_CONF=<another path>"
    fi
    local cpus mem
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512 ))
    as_root mkdir -p "$(dirname "$CONF")" "$STATE/ctld" "$STATE/d"
    as_root tee "$CONF" >/dev/null <<EOF
$MARK: one node ($HOST, $cpus CPUs, ${mem} MB), for tests
ClusterName=vss-local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
JobRequeue=1
KillWait=30
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/jobcomp.txt
SlurmctldTimeout=30
SlurmdTimeout=30
MinJobAge=600
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    say "wrote $CONF ($cpus CPUs, ${mem} MB)"
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if munge_ok; then say "munged is already running: using it"; return; fi
    if [ ! -s /etc/munge/munge.key ]; then
        as_root mkdir -p /etc/munge
        if command -v mungekey >/dev/null; then as_root mungekey --create --keyfile=/etc/munge/munge.key
        else as_root dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
    fi
    as_root mkdir -p /run/munge /var/log/munge /var/lib/munge
    if id munge >/dev/null 2>&1; then
        as_root chown munge:munge /etc/munge/munge.key /run/munge /var/log/munge /var/lib/munge
        as_root chmod 0400 /etc/munge/munge.key
        as_root runuser -u munge -- munged --pid-file=/run/munge/munged.pid
    else
        as_root munged --force --pid-file=/run/munge/munged.pid
    fi
    for _ in $(seq 20); do munge_ok && break; sleep 0.5; done
    munge_ok || die "munged did not start (see /var/log/munge/munged.log)"
    echo "munged /run/munge/munged.pid" >>"$STARTED"
    say "started munged (pid $(cat /run/munge/munged.pid))"
}

start_daemon() {  # name: slurmctld | slurmd
    local name=$1 pidfile=$STATE/$1.pid
    if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        say "$name is already running (pid $(cat "$pidfile")): using it"
        return
    fi
    as_root env SLURM_CONF="$CONF" "$name" || die "$name did not start (see $STATE/$name.log)"
    for _ in $(seq 40); do [ -s "$pidfile" ] && break; sleep 0.25; done
    [ -s "$pidfile" ] || die "$name wrote no pid file (see $STATE/$name.log)"
    echo "$name $pidfile" >>"$STARTED"
    say "started $name (pid $(cat "$pidfile"))"
}

wait_idle() {
    local state=""
    for i in $(seq 120); do
        state=$(SLURM_CONF=$CONF sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -1 || true)
        case "$state" in
            idle*) SLURM_CONF=$CONF sinfo; say "node $HOST is idle: ready"; return ;;
            down*|drain*|unknown*) [ $((i % 10)) = 0 ] && as_root env SLURM_CONF="$CONF" scontrol update \
                nodename="$HOST" state=resume 2>/dev/null || true ;;
        esac
        sleep 0.5
    done
    die "node $HOST is not idle after 60 s (state: ${state:-none}); see $STATE/slurmctld.log and $STATE/slurmd.log"
}

stop_all() {
    if [ ! -s "$STARTED" ]; then say "no daemon started by this script is recorded in $STARTED"; return; fi
    tac "$STARTED" | while read -r name pidfile; do
        local pid
        pid=$(cat "$pidfile" 2>/dev/null || true)
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            as_root kill -TERM "$pid"
            for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
            kill -0 "$pid" 2>/dev/null && die "$name (pid $pid) did not stop"
            say "stopped $name (pid $pid)"
        else
            say "$name is not running"
        fi
    done
    rm -f "$STARTED"
}

mkdir -p "$STATE"
case "${1:-}" in
    start)
        install_packages
        write_conf
        start_munge
        start_daemon slurmctld
        start_daemon slurmd
        wait_idle
        ;;
    stop) stop_all ;;
    status)
        [ -s "$STARTED" ] && cat "$STARTED" || say "nothing started by this script"
        SLURM_CONF=$CONF sinfo 2>/dev/null || say "sinfo: no controller answers"
        ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
