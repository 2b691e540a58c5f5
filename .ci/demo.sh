#!/usr/bin/env bash
# The README's first command: the main job on the embedded default (local executor unless a
# SLURM controller answers, tiny models built offline if missing). No GPU, no download.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup.sh
export DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1
py=.venv/bin/python
[ -f data/raw_questions.jsonl ] || $py -m hpc.launch data
$py -m hpc.launch tiny-models
$py -m hpc.launch generate --config templates/demo.yaml --output runs/demo/teacher_cot.jsonl "$@"
$py -m hpc.launch status runs/demo
