#!/usr/bin/env bash
# The README's first command: the whole pipeline on the embedded default (templates/demo.yaml:
# local executor unless a SLURM controller answers, tiny models built offline if missing).
# No GPU, no download. Extra arguments go to `pipeline`, e.g. --set generate.shards=4.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup.sh
export DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1
.venv/bin/python -m hpc.launch pipeline --config templates/demo.yaml "$@"
