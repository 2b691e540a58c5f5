#!/usr/bin/env bash
# Creates .venv at the repo root with the pinned CPU stack and cot-hpc installed editable.
# Idempotent: a second run only checks. Used by .ci/demo.sh and .ci/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.cot-hpc-installed
want=$(cat .ci/constraints.txt pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/pip install -q --upgrade pip
  # torch first and pinned, so no resolver step can pick a CUDA build.
  .venv/bin/pip install -q "torch==2.13.0"
  .venv/bin/pip install -q -c .ci/constraints.txt -e ".[dev]"
  echo "$want" > "$stamp"
fi
# DeepSpeed JIT-compiles a CPU helper with g++ on first use.
command -v g++ >/dev/null || { apt-get update -qq && apt-get install -y -qq g++; }
echo "python env ready: $(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
