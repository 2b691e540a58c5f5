#!/usr/bin/env bash
# Stop and restart only slurmctld of the cluster in STATE_DIR (state is kept
# in StateSaveLocation), then wait until `scontrol ping` answers again and
# both nodes have registered.
#
#   hpc/devcluster/restart-controller.sh STATE_DIR
set -euo pipefail

[[ $# -eq 1 ]] || { echo "usage: $0 STATE_DIR" >&2; exit 2; }
S=$(cd "$1" && pwd -P)
export SLURM_CONF=$S/slurm.conf
PIDFILE=$S/run/slurmctld.pid
WAIT_S=${COT_HPC_SLURM_WAIT_S:-60}
[[ -f $SLURM_CONF ]] || { echo "restart-controller.sh: no $SLURM_CONF (run up.sh first)" >&2; exit 1; }
T0=$(date +%s.%N)

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
stopped=()
stop "$PIDFILE" slurmctld

slurmctld -f "$SLURM_CONF" </dev/null >/dev/null 2>&1 || {
    echo "restart-controller.sh: slurmctld failed to start" >&2
    tail -n 20 "$S/log/slurmctld.log" >&2 || true
    exit 1
}
end=$(($(date +%s) + WAIT_S))
until scontrol ping >/dev/null 2>&1; do
    if [[ $(date +%s) -ge $end ]]; then
        echo "restart-controller.sh: slurmctld does not answer" >&2
        tail -n 20 "$S/log/slurmctld.log" >&2 || true
        exit 1
    fi
    sleep 0.1
done
# Then until both nodes have registered again (not unknown / not responding).
nodes_ok() {
    local out
    out=$(sinfo -h -N -p debug -o '%N %t' 2>/dev/null) || return 1
    [[ $(grep -Ec '^n[12] [a-z]+$' <<<"$out") -eq 2 ]] && ! grep -Eq ' (unk|down|drain|fail|futr)' <<<"$out"
}
until nodes_ok; do
    if [[ $(date +%s) -ge $end ]]; then
        echo "restart-controller.sh: nodes did not register again" >&2; exit 1
    fi
    sleep 0.1
done
printf 'devcluster slurmctld restarted: %s in %.1fs\n' "$S" \
    "$(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')"
