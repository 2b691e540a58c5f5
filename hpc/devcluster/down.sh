#!/usr/bin/env bash
# Stop the private Slurm cluster that hpc/devcluster/up.sh started in STATE_DIR.
#
#   hpc/devcluster/down.sh STATE_DIR
#
# Cancels this cluster's jobs (if slurmctld answers), stops the daemons by
# their pid files only (slurmd n1/n2, slurmctld, slurmdbd, mariadbd, munged),
# then leftover slurmstepd processes of this cluster and their job processes,
# and removes the exact /etc/hosts line that up.sh added.  Touches no other
# process.  Idempotent.  STATE_DIR is kept (logs, database); up.sh reuses it.
set -euo pipefail

[[ $# -eq 1 ]] || { echo "usage: $0 STATE_DIR" >&2; exit 2; }
if [[ -d $1 ]]; then S=$(cd "$1" && pwd -P); else S=$(realpath -m "$1"); fi
CONF=$S/slurm.conf
HOSTS_LINE="127.0.0.1 n1 n2 # cot-hpc-devcluster:$S"
T0=$(date +%s.%N)

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

zombie() { [[ $(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null) == Z ]]; }

# pids of live slurmstepd processes of this cluster.  slurmstepd overwrites
# its environment with its process title, so besides SLURM_CONF in the
# environment also accept a cwd or an open file (its slurmd log) in STATE_DIR.
stepds() {
    local d pid
    for d in /proc/[0-9]*; do
        pid=${d#/proc/}
        [[ $(cat "$d/comm" 2>/dev/null) == slurmstepd ]] || continue
        zombie "$pid" && continue
        if tr '\0' '\n' 2>/dev/null <"$d/environ" | grep -qxF "SLURM_CONF=$CONF" ||
            [[ $(readlink "$d/cwd" 2>/dev/null)/ == "$S"/* ]] ||
            find "$d/fd" -mindepth 1 -maxdepth 1 -lname "$S/*" 2>/dev/null | grep -q .; then
            echo "$pid"
        fi
    done
}

# pids of live job processes of this cluster: descendants of its slurmstepd
# processes, and orphans whose environment has both this SLURM_CONF and a
# SLURM_JOB_ID.  Never this script or its ancestors.
job_procs() {
    local pid ppid stat p keep=" $$ " roots=" $* "
    local -A parent=()
    while read -r pid ppid stat; do
        [[ $stat == Z* ]] || parent[$pid]=$ppid
    done < <(ps -e -o pid= -o ppid= -o stat=)
    p=$$
    while [[ -n $p && $p -gt 1 ]]; do keep+="$p "; p=${parent[$p]:-}; done
    for pid in "${!parent[@]}"; do
        [[ $keep == *" $pid "* || $roots == *" $pid "* ]] && continue
        p=${parent[$pid]}
        while [[ -n $p && $p -gt 1 ]]; do
            [[ $roots == *" $p "* ]] && { echo "$pid"; continue 2; }
            p=${parent[$p]:-}
        done
        if tr '\0' '\n' 2>/dev/null <"/proc/$pid/environ" | grep -qxF "SLURM_CONF=$CONF" &&
            tr '\0' '\n' 2>/dev/null <"/proc/$pid/environ" | grep -q '^SLURM_JOB_ID='; then
            echo "$pid"
        fi
    done
}

# kill_all NAME WAIT_TENTHS PID...: TERM, wait, then KILL
kill_all() {
    local name=$1 tenths=$2 i p left; shift 2
    [[ $# -gt 0 ]] || return 0
    kill -TERM "$@" 2>/dev/null || true
    for ((i = 0; i < tenths; i++)); do
        left=()
        for p in "$@"; do [[ -d /proc/$p ]] && ! zombie "$p" && left+=("$p"); done
        [[ ${#left[@]} -gt 0 ]] || break
        sleep 0.1
    done
    [[ ${#left[@]} -eq 0 ]] || kill -KILL "${left[@]}" 2>/dev/null || true
    stopped+=("$name")
}

stopped=()
S_RUN=$S/run
export SLURM_CONF=$CONF

# Cancel this cluster's jobs first so that slurmstepd ends them cleanly.
if [[ -f $CONF ]] && alive "$S_RUN/slurmctld.pid" slurmctld; then
    mapfile -t jobs < <(timeout 3 squeue -h -o %A 2>/dev/null || true)
    if [[ ${#jobs[@]} -gt 0 ]]; then
        timeout 3 scancel "${jobs[@]}" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            [[ -z $(timeout 3 squeue -h -o %A 2>/dev/null || true) ]] && break
            sleep 0.1
        done
        stopped+=("jobs:${#jobs[@]}")
    fi
fi

if [[ -d $S_RUN ]]; then
    stop "$S_RUN/slurmd.n1.pid" slurmd
    stop "$S_RUN/slurmd.n2.pid" slurmd
    stop "$S_RUN/slurmctld.pid" slurmctld
    stop "$S_RUN/slurmdbd.pid" slurmdbd
    stop "$S_RUN/mariadbd.pid" mariadbd
    stop "$S_RUN/munged.pid" munged
fi

# slurmstepd processes (and their job processes) outlive slurmd.  End the
# job processes first; slurmstepd ignores SIGTERM, so it gets SIGKILL soon.
mapfile -t steps < <(stepds)
mapfile -t procs < <(job_procs "${steps[@]}")
kill_all job-processes 50 "${procs[@]}"
kill_all slurmstepd 5 "${steps[@]}"

hosts_remove "$HOSTS_LINE"  # the exact line up.sh added; atomically (see lib.sh)

printf 'devcluster down: %s (stopped: %s) in %.1fs\n' "$S" "${stopped[*]:-nothing}" \
    "$(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')"
