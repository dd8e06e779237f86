#!/usr/bin/env bash
# Bring up a real one-node SLURM cluster on this machine (for tests/test_slurm_cluster.py and for
# trying `dialtune slurm` locally). Idempotent: run it again and it reuses what is running.
#
#   bash .ci/setup_slurm.sh          # install if needed, configure, start, wait for the node
#   bash .ci/setup_slurm.sh --stop   # stop the daemons this script started (by their pid files)
#
# - installs slurmd slurmctld slurm-client munge with apt-get when `sbatch` is missing (root);
# - writes $DIALTUNE_SLURM_DIR/slurm.conf (default /tmp/dialtune-slurm): SlurmUser=root,
#   auth/munge, proctrack/linuxproc, task/none (no cgroups needed), cons_tres CR_Core,
#   this host as the only node (CPUs=$(nproc), RealMemory from `slurmd -C`), partition `debug`;
#   state, spool, logs and pid files all live in that directory; ports 16817/16818 so that a
#   system SLURM on the default ports is left alone;
# - starts munged (as the munge user), slurmctld and slurmd unless they already run, and waits
#   until `sinfo` shows the node up (idle, or busy with jobs);
# - prints `export SLURM_CONF=...` on stdout (everything else goes to stderr).
# On failure it exits 1 with one line `setup_slurm: error: <reason>` on stderr.
set -uo pipefail

DIR=${DIALTUNE_SLURM_DIR:-/tmp/dialtune-slurm}
CONF=$DIR/slurm.conf
TIMEOUT=${DIALTUNE_SLURM_TIMEOUT:-60}
CTLD_PORT=${DIALTUNE_SLURMCTLD_PORT:-16817}
SLURMD_PORT=${DIALTUNE_SLURMD_PORT:-16818}

die() { echo "setup_slurm: error: $*" >&2; exit 1; }
say() { echo "setup_slurm: $*" >&2; }

# pid from a pid file if that process is alive and is the named program
alive() {  # alive <pidfile> <comm>
    local pid
    [ -s "$1" ] || return 1
    pid=$(cat "$1" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || return 1
    echo "$pid"
}

stop_daemons() {
    local name pid
    for name in slurmd slurmctld; do
        if pid=$(alive "$DIR/$name.pid" "$name"); then
            say "stopping $name (pid $pid)"
            kill "$pid" 2>/dev/null
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
        fi
    done
}

if [ "${1:-}" = "--stop" ]; then
    stop_daemons
    exit 0
fi

# ---- install ----------------------------------------------------------------------------------
need_install=0
for tool in sbatch slurmctld slurmd munged; do
    command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || need_install=1
done
if [ "$need_install" = 1 ]; then
    [ "$(id -u)" = 0 ] || die "SLURM is not installed and installing it needs root (apt-get install slurmd slurmctld slurm-client munge)"
    command -v apt-get >/dev/null 2>&1 || die "SLURM is not installed and there is no apt-get to install it with"
    say "installing slurmd slurmctld slurm-client munge with apt-get"
    log=$(mktemp)
    if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            slurmd slurmctld slurm-client munge; } >"$log" 2>&1; then
        tail -n 5 "$log" >&2
        die "apt-get install slurmd slurmctld slurm-client munge failed (log above)"
    fi
    rm -f "$log"
fi
export PATH=$PATH:/usr/sbin:/sbin
for tool in sbatch sinfo scontrol slurmctld slurmd munged munge unmunge; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is missing after installation"
done

# ---- configuration ----------------------------------------------------------------------------
HOST=$(hostname -s) || die "hostname -s failed"
CPUS=$(nproc)
MEM=$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -n1)
[[ ${MEM:-} =~ ^[0-9]+$ ]] || die "slurmd -C did not report RealMemory"
[ "$MEM" -gt 256 ] && MEM=$((MEM - 256))   # a little headroom: slurmd drains a node that has less than configured

mkdir -p "$DIR/state" "$DIR/spool" || die "cannot create $DIR"
new=$(mktemp)
cat >"$new" <<EOF
# Written by .ci/setup_slurm.sh: a one-node SLURM cluster without cgroups.
ClusterName=dialtune
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=2,bf_interval=1
ReturnToService=2
MailProg=/bin/true
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
if ! cmp -s "$new" "$CONF"; then
    # A changed configuration (other host name, CPUs, memory): restart what runs on the old one.
    [ -e "$CONF" ] && { say "configuration changed: restarting the daemons"; stop_daemons; }
    mv "$new" "$CONF" || die "cannot write $CONF"
    chmod 644 "$CONF"
else
    rm -f "$new"
fi
export SLURM_CONF=$CONF

# ---- munge ------------------------------------------------------------------------------------
munge_ok() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! munge_ok; then
    [ "$(id -u)" = 0 ] || die "munged is not running and starting it needs root"
    id munge >/dev/null 2>&1 || die "there is no munge user (is the munge package installed?)"
    install -d -o munge -g munge -m 0755 /run/munge || die "cannot create /run/munge"
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge /etc/munge 2>/dev/null
    if [ ! -s /etc/munge/munge.key ]; then
        say "creating /etc/munge/munge.key"
        if command -v mungekey >/dev/null 2>&1; then
            runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key >/dev/null 2>&1
        fi
        if [ ! -s /etc/munge/munge.key ]; then
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none || die "cannot create /etc/munge/munge.key"
        fi
        chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    fi
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged >/dev/null 2>&1 || runuser -u munge -- /usr/sbin/munged --force >/dev/null 2>&1
    for _ in $(seq 50); do munge_ok && break; sleep 0.2; done
    munge_ok || die "munged does not answer (munge -n | unmunge fails); see /var/log/munge/munged.log"
fi

# ---- slurmctld, slurmd ------------------------------------------------------------------------
start() {  # start <name>
    local name=$1
    if alive "$DIR/$name.pid" "$name" >/dev/null; then
        return 0
    fi
    [ "$(id -u)" = 0 ] || die "$name is not running and starting it needs root (SlurmUser=root)"
    say "starting $name"
    if ! "$name" -f "$CONF" >>"$DIR/$name.start.log" 2>&1; then
        die "$name failed to start; see $DIR/$name.log and $DIR/$name.start.log"
    fi
    for _ in $(seq 50); do alive "$DIR/$name.pid" "$name" >/dev/null && break; sleep 0.2; done
    sleep 1  # a daemon writes its pid file before it binds its port: make sure it stayed up
    if ! alive "$DIR/$name.pid" "$name" >/dev/null; then
        local reason
        reason=$(grep -hE "fatal:|error:" "$DIR/$name.log" "$DIR/$name.start.log" 2>/dev/null | tail -n1 | sed 's/^\[[^]]*\] //')
        die "$name exited right after starting (${reason:-no message}); see $DIR/$name.log"
    fi
}
start slurmctld
start slurmd

# ---- wait for the node ------------------------------------------------------------------------
deadline=$((SECONDS + TIMEOUT))
state=
while [ $SECONDS -lt $deadline ]; do
    state=$(sinfo -h -n "$HOST" -o %t 2>/dev/null | head -n1)
    case "$state" in
        idle|mix|alloc|comp) break ;;
        drain|drng|down) scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 ;;
    esac
    sleep 0.5
done
case "$state" in
    idle|mix|alloc|comp) ;;
    "") die "sinfo shows no node $HOST after ${TIMEOUT}s (slurmctld not answering?); see $DIR/slurmctld.log" ;;
    *) die "node $HOST is '$state' after ${TIMEOUT}s, not idle; see $DIR/slurmd.log and $DIR/slurmctld.log" ;;
esac
say "node $HOST is $state (${CPUS} CPUs, ${MEM} MB), partition debug"
echo "export SLURM_CONF=$CONF"
