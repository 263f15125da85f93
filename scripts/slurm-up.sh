#!/usr/bin/env bash
# Bring up a single-node Slurm cluster (munged, slurmctld, slurmd) under DIR, for tests and for
# trying `incubation run --launcher slurm` on one machine:
#
#     scripts/slurm-up.sh DIR          # prints: export SLURM_CONF=DIR/slurm.conf
#     export SLURM_CONF=DIR/slurm.conf
#     ...
#     scripts/slurm-down.sh DIR        # stops the three daemons by their pid files
#
# Everything (config, munge key and socket, state, spool, logs, pid files) lives under DIR; the
# ports are free ones chosen now, so two clusters on one machine do not meet. As root, Debian's
# slurm-wlm and munge are installed when missing. Exits non-zero with one line on stderr when the
# cluster cannot start (not root, no packages, a daemon that does not come up).
set -euo pipefail

die() { echo "slurm-up: $*" >&2; exit 1; }
[ $# -eq 1 ] || die "usage: scripts/slurm-up.sh DIR"
mkdir -p "$1"
DIR=$(cd "$1" && pwd)

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    [ "$(id -u)" = 0 ] || die "slurm-wlm and munge are not installed, and installing them needs root"
    command -v apt-get >/dev/null || die "slurm-wlm and munge are not installed, and there is no apt-get"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -q && apt-get install -y -q slurm-wlm munge; } >"$DIR/apt.log" 2>&1 \
        || die "apt-get install slurm-wlm munge failed (see $DIR/apt.log)"
fi
# slurmctld, slurmd and munged run as root here: SlurmUser=root, and munged needs --force
[ "$(id -u)" = 0 ] || die "the test cluster runs its daemons as root (SlurmUser=root); run as root"

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
CTLD_PORT=${SLURM_TEST_CTLD_PORT:-$(free_port)}
SLURMD_PORT=${SLURM_TEST_SLURMD_PORT:-$(free_port)}
[ "$CTLD_PORT" != "$SLURMD_PORT" ] || SLURMD_PORT=$(free_port)

mkdir -p "$DIR/munge" "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/run"
chmod 700 "$DIR/munge"
[ -f "$DIR/munge/munge.key" ] || mungekey --create --keyfile="$DIR/munge/munge.key" >/dev/null
SOCKET="$DIR/munge/munge.socket"
munged --force --socket="$SOCKET" --key-file="$DIR/munge/munge.key" --pid-file="$DIR/run/munged.pid" \
    --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" \
    || die "munged did not start (see $DIR/log/munged.log)"

# The node as slurmd sees it (CPUs, sockets, cores, threads, memory), named localhost
NODE=$(slurmd -C | head -n 1 | sed 's/^NodeName=[^ ]*/NodeName=localhost/')
cat >"$DIR/slurm.conf" <<EOF
# Written by scripts/slurm-up.sh: a single-node cluster for tests.
ClusterName=incubation-test
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
# munged's own socket. A requeued job may start again cred_expire s later (default 120), and only
# at the next scheduling pass (sched_interval, default 60 s): 10 + 1 make a requeue take ~11 s.
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET,cred_expire=10
# no cgroups in a container
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# no accounting: the launcher reads squeue while Slurm remembers a job (MinJobAge, seconds)
AccountingStorageType=accounting_storage/none
MinJobAge=3600
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
# dependents of a failed job are cancelled, never left pending (only here in 22.05)
DependencyParameters=kill_invalid_depend
# a request larger than the node is refused at submission instead of pending forever
EnforcePartLimits=ALL
JobRequeue=1
# a cancelled job's processes get SIGKILL 5 s after SIGTERM (default 30): slurm-down.sh waits for them
KillWait=5
ReturnToService=2
MpiDefault=none
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
$NODE State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF="$DIR/slurm.conf"

slurmctld -i || die "slurmctld did not start (see $DIR/log/slurmctld.log)"
slurmd -N localhost || die "slurmd did not start (see $DIR/log/slurmd.log)"
for _ in $(seq 100); do  # up to 10 s for the node to register
    state=$(sinfo -h -n localhost -o %T 2>/dev/null || true)
    case "$state" in idle|mixed|allocated) echo "export SLURM_CONF=$DIR/slurm.conf"; exit 0 ;; esac
    sleep 0.1
done
die "the node did not come up (state '${state:-unknown}'; see $DIR/log/slurmctld.log and slurmd.log)"
