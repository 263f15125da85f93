#!/usr/bin/env bash
# Stop the cluster that scripts/slurm-up.sh DIR started: slurmd, slurmctld, then munged, each by
# the pid in its pid file under DIR/run (TERM, then KILL after 10 s), after cancelling the jobs
# still in it. Nothing else is touched.
set -uo pipefail

[ $# -eq 1 ] || { echo "usage: scripts/slurm-down.sh DIR" >&2; exit 1; }
RUN="$1/run"

stop() {  # stop NAME: the process in $RUN/NAME.pid, if it is still that daemon
    local file="$RUN/$1.pid" pid
    [ -f "$file" ] || return 0
    pid=$(cat "$file")
    if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ]; then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null
    fi
    rm -f "$file"
}

# its jobs first, so that no job step outlives the cluster (up to 20 s for them to end: KillWait is 5)
if [ -f "$1/slurm.conf" ] && [ -f "$RUN/slurmctld.pid" ]; then
    export SLURM_CONF="$1/slurm.conf"
    jobs=$(timeout 10 squeue -h -o %A 2>/dev/null | sort -u)
    if [ -n "$jobs" ]; then
        timeout 10 scancel $jobs 2>/dev/null
        for _ in $(seq 200); do
            [ -z "$(timeout 10 squeue -h -t running,completing -o %A 2>/dev/null)" ] && break
            sleep 0.1
        done
    fi
fi
stop slurmd
stop slurmctld
stop munged
exit 0
