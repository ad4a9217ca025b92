#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for the slow cluster tests (tests/test_slurm.py).
#
#   scripts/slurm-local.sh start    install slurm-wlm + munge when missing (Debian, as root), write a one-node
#                                   slurm.conf for this machine, start munged, slurmctld and slurmd, and wait
#                                   until sinfo shows the node idle
#   scripts/slurm-local.sh status   the daemons this script started and sinfo
#   scripts/slurm-local.sh stop     stop only the daemons this script started (by their pid files)
#
# VSS_SLURM_NODES=2 scripts/slurm-local.sh start: two nodes on this machine for the multi-node tests. Node n2 is a
# network namespace (vss-n2, veth "vssgl": 10.77.0.1 here, 10.77.0.2 there; n1/n2 in /etc/hosts) with its own
# slurmd; each node gets half the CPUs. DDP over gloo between them needs GLOO_SOCKET_IFNAME=vssgl (the veth has
# that name on both sides). `stop` removes the namespace, the veth and the /etc/hosts lines again.
#
# Jobs are accounted to a text file (JobCompType=jobcomp/filetxt): `sacct --completion` (alias `sacct -c`) lists
# them; there is no slurmdbd. State, logs and pid files live in $VSS_SLURM_DIR (default /var/tmp/vss-slurm).
set -euo pipefail

STATE=${VSS_SLURM_DIR:-/var/tmp/vss-slurm}
CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
MARK="# written by vss scripts/slurm-local.sh"
STARTED=$STATE/started          # "name pidfile" per daemon this script started
HOST=$(hostname -s)
NODES=${VSS_SLURM_NODES:-1}
NETNS=vss-n2
HOSTS_MARK="# vss slurm-local two-node test"
[ "$NODES" = 1 ] || [ "$NODES" = 2 ] || { echo "[slurm-local] error: VSS_SLURM_NODES=$NODES: expected 1 or 2" >&2; exit 2; }

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
    if [ "$NODES" = 1 ]; then
        CTLD_ADDR=127.0.0.1
        NODE_LINES="NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN"
    else
        [ "$cpus" -ge 2 ] || die "two nodes need at least 2 CPUs (nproc: $cpus)"
        CTLD_ADDR=10.77.0.1
        cpus=$((cpus / 2)); mem=$((mem / 2))
        NODE_LINES="NodeName=n1 NodeAddr=10.77.0.1 NodeHostname=$HOST CPUs=$cpus RealMemory=$mem State=UNKNOWN
NodeName=n2 NodeAddr=10.77.0.2 NodeHostname=$HOST CPUs=$cpus RealMemory=$mem State=UNKNOWN"
    fi
    as_root mkdir -p "$(dirname "$CONF")" "$STATE/ctld"
    as_root tee "$CONF" >/dev/null <<EOF
$MARK: one node ($HOST, $cpus CPUs, ${mem} MB), for tests
ClusterName=vss-local
SlurmctldHost=$HOST($CTLD_ADDR)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d-%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd-%n.log
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
$NODE_LINES
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    say "wrote $CONF ($NODES node(s), $cpus CPUs and ${mem} MB each)"
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

start_daemon() {  # slurmctld | slurmd NODE [NETNS]
    local name=$1 node=${2:-} netns=${3:-} pidfile label
    pidfile=$STATE/$name${node:+-$node}.pid
    label=$name${node:+ ($node)}
    if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        say "$label is already running (pid $(cat "$pidfile")): using it"
        return
    fi
    local cmd=(env SLURM_CONF="$CONF" "$name")
    [ -n "$node" ] && cmd+=(-N "$node")
    [ -n "$netns" ] && cmd=(nsenter --net=/run/netns/"$netns" "${cmd[@]}")  # not ip netns exec: it remounts /sys (no cgroup fs)
    as_root "${cmd[@]}" || die "$label did not start (see $STATE/$name${node:+-$node}.log)"
    for _ in $(seq 40); do [ -s "$pidfile" ] && break; sleep 0.25; done
    [ -s "$pidfile" ] || die "$label wrote no pid file (see $STATE/$name${node:+-$node}.log)"
    echo "$name $pidfile" >>"$STARTED"
    say "started $label (pid $(cat "$pidfile"))"
}

add_netns() {  # node n2: a network namespace joined to this one by the veth pair "vssgl"
    ip netns list | grep -qw "$NETNS" || as_root ip netns add "$NETNS"
    if ! ip link show vssgl >/dev/null 2>&1; then
        as_root ip link add vssgl type veth peer name vssgl-n2
        as_root ip link set vssgl-n2 netns "$NETNS"
        as_root ip netns exec "$NETNS" ip link set vssgl-n2 name vssgl
        as_root ip addr add 10.77.0.1/24 dev vssgl
        as_root ip link set vssgl up
        as_root ip netns exec "$NETNS" ip addr add 10.77.0.2/24 dev vssgl
        as_root ip netns exec "$NETNS" ip link set vssgl up
        as_root ip netns exec "$NETNS" ip link set lo up
    fi
    grep -qF "$HOSTS_MARK" /etc/hosts || printf '10.77.0.1 n1 %s\n10.77.0.2 n2 %s\n' "$HOSTS_MARK" "$HOSTS_MARK" \
        | as_root tee -a /etc/hosts >/dev/null
    grep -qs "^netns " "$STARTED" || echo "netns $NETNS" >>"$STARTED"
    say "node n2: network namespace $NETNS (10.77.0.2), node n1: 10.77.0.1"
}

remove_netns() {
    ip link show vssgl >/dev/null 2>&1 && as_root ip link del vssgl
    ip netns list | grep -qw "$NETNS" && as_root ip netns del "$NETNS"
    if grep -qF "$HOSTS_MARK" /etc/hosts; then  # in place: /etc/hosts may be a bind mount
        grep -vF "$HOSTS_MARK" /etc/hosts >"$STATE/hosts.tmp" && cat "$STATE/hosts.tmp" | as_root tee /etc/hosts >/dev/null
    fi
    say "removed the network namespace $NETNS, the veth vssgl and the n1/n2 host names"
}

wait_idle() {
    local names states="" i
    names=$([ "$NODES" = 1 ] && echo "$HOST" || echo "n1,n2")
    for i in $(seq 120); do
        states=$(SLURM_CONF=$CONF sinfo -h -N -n "$names" -o %T 2>/dev/null | sort -u | tr '\n' ' ' || true)
        if [ "$states" = "idle " ]; then
            SLURM_CONF=$CONF sinfo; say "node(s) $names idle: ready"; return
        fi
        if [ $((i % 10)) = 0 ] && [[ "$states" =~ down|drain|unknown ]]; then
            as_root env SLURM_CONF="$CONF" scontrol update nodename="$names" state=resume 2>/dev/null || true
        fi
        sleep 0.5
    done
    die "node(s) $names not idle after 60 s (states: ${states:-none}); see $STATE/slurmctld.log and $STATE/slurmd-*.log"
}

stop_all() {
    if [ ! -s "$STARTED" ]; then say "no daemon started by this script is recorded in $STARTED"; return; fi
    tac "$STARTED" | while read -r name pidfile; do
        if [ "$name" = netns ]; then remove_netns; continue; fi
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
        [ "$NODES" = 2 ] && add_netns
        start_daemon slurmctld
        if [ "$NODES" = 1 ]; then
            start_daemon slurmd "$HOST"
        else
            start_daemon slurmd n1
            start_daemon slurmd n2 "$NETNS"
        fi
        wait_idle
        ;;
    stop) stop_all ;;
    status)
        [ -s "$STARTED" ] && cat "$STARTED" || say "nothing started by this script"
        SLURM_CONF=$CONF sinfo 2>/dev/null || say "sinfo: no controller answers"
        ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
