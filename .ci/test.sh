#!/usr/bin/env bash
# Installs everything (Python env in .venv, Debian's Slurm + munge + slurmdbd + MariaDB) and runs
# the whole test suite, slow and real-Slurm tests included. The README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup.sh
export DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
state=${COT_HPC_SLURM_STATE:-/tmp/cothpc-slurm}
# The pytest session fixture brings the cluster up from the same script; doing it here first
# installs the apt packages once, outside the timed tests.
bash hpc/devcluster/up.sh "$state"
trap 'bash hpc/devcluster/down.sh "$state" >/dev/null 2>&1 || true' EXIT
export COT_HPC_KEEP_SLURM=1 COT_HPC_SLURM_STATE="$state"
.venv/bin/ruff check hpc cot jobs tests benchmarks
.venv/bin/ruff format --check hpc cot jobs tests benchmarks
.venv/bin/mypy
# The default `pytest` run skips tests marked slow; here everything runs, Slurm included.
.venv/bin/python -m pytest -p no:cacheprovider -m "slow or not slow" --durations=25 "$@"
