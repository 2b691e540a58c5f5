#!/usr/bin/env bash
# GPU check of the training path and of the teacher engines, a few minutes at most:
# 1. training: tiny student, NF4 + paged_adamw_8bit + DeepSpeed ZeRO-2 on CUDA; prints the median
#    optimizer-step time, tokens/s and the peak GPU memory;
# 2. teacher: benchmarks/teacher_gpu.py, the server engine with vLLM against the hf engine on a
#    randomly initialised model of Qwen2.5-0.5B's shape, output tokens/s (goal >= 5x); where vLLM
#    is not installed it measures the hf engine alone and says so (SERVER=sglang to try SGLang).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          (default OUT_DIR: /tmp/cothpc-gpu-check)
#   PYTHON=/path/to/python STEPS=40 bash benchmarks/gpu_check.sh
#
# It needs a Python whose torch sees CUDA, with this repo's requirements (bitsandbytes with CUDA
# kernels, deepspeed, peft). models/ and data/ are git-ignored: bring models/tiny (and data/) along,
# or it builds them (tiny-models trains on CPU, about a minute). One process on GPU 0 runs the
# stage callable (jobs.train.Train) directly, so the check does not depend on a scheduler.
# Exit codes: 0 ok, 2 no CUDA device, 1 the training failed or did not use what it was told.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT=${1:-/tmp/cothpc-gpu-check}
STEPS=${STEPS:-30}

pick_python() {
    local c
    for c in "${PYTHON:-}" "$REPO/.venv/bin/python" python3 python; do
        [[ -n "$c" ]] || continue
        command -v "$c" >/dev/null 2>&1 || continue
        if "$c" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null
        then
            echo "$c"
            return 0
        fi
    done
    return 1
}

if ! PY=$(pick_python); then
    echo "gpu_check: no CUDA device: no Python here has a torch that sees a GPU" \
         "(tried \$PYTHON, .venv/bin/python, python3, python); nothing to check." >&2
    command -v nvidia-smi >/dev/null 2>&1 || echo "gpu_check: nvidia-smi is not installed either." >&2
    exit 2
fi

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export DS_ACCELERATOR=cuda            # never let DeepSpeed fall back to its CPU accelerator here
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}

echo "gpu_check: python $PY"
"$PY" -c 'import torch, transformers, peft, deepspeed, bitsandbytes as b
print(f"gpu_check: torch {torch.__version__} (CUDA {torch.version.cuda}), transformers "
      f"{transformers.__version__}, peft {peft.__version__}, deepspeed {deepspeed.__version__}, "
      f"bitsandbytes {b.__version__}; GPU 0: {torch.cuda.get_device_name(0)}")'

[[ -f data/raw_questions.jsonl ]] || "$PY" -m hpc.launch data
[[ -f models/tiny/student/config.json ]] || "$PY" -m hpc.launch tiny-models

rm -rf "$OUT"
mkdir -p "$OUT"
"$PY" - "$OUT" "$STEPS" <<'EOF'
import json
import statistics
import sys
import time
from pathlib import Path

from hpc.config import TrainConfig
from hpc.stages.train import resolve
from jobs.train import Train

out, steps = Path(sys.argv[1]), int(sys.argv[2])
data = out / "train.jsonl"
with open("data/raw_questions.jsonl", encoding="utf-8") as src, open(data, "w") as dst:
    for line in src:
        r = json.loads(line)
        dst.write(json.dumps({"question": r["question"], "cot": r["reference_cot"]}) + "\n")
cfg = TrainConfig(
    student="models/tiny/student", data=str(data), run_dir=str(out), out_dir=str(out / "train"),
    quant="nf4", optim="paged_adamw_8bit", deepspeed="templates/ds_zero2.json",
    max_steps=steps, save_steps=max(1, steps // 2), logging_steps=1, max_length=512,
    per_device_train_batch_size=16, gradient_accumulation_steps=1, lr=1.0e-3, cpus_per_task=4,
)
t0 = time.time()
result = Train()(resolve(cfg))  # one process: world size 1, ZeRO-2 engine on GPU 0
wall = time.time() - t0
rows = [json.loads(x) for x in (out / "train" / "metrics.jsonl").read_text().splitlines()]
eng = result["engine"]
step = statistics.median(r["step_time_s"] for r in rows[2:]) if len(rows) > 2 else float("nan")
tps = statistics.median(r["tokens_per_s"] for r in rows[2:]) if len(rows) > 2 else float("nan")
peak = max((r.get("gpu_peak_mem_gb") or 0.0) for r in rows)
print(f"gpu_check: {result['global_step']} steps in {wall:.0f}s (setup included), "
      f"loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}")
print(f"gpu_check: median step {step * 1000:.1f} ms, median {tps:.0f} tokens/s, "
      f"peak GPU memory {peak:.3f} GiB (torch.cuda.max_memory_allocated)")
print(f"gpu_check: engine {json.dumps(eng)}")
problems = []
if not eng["device"].startswith("cuda"):
    problems.append(f"trained on {eng['device']}, not CUDA")
if eng["zero_stage"] != 2:
    problems.append(f"ZeRO stage {eng['zero_stage']}, expected 2")
if not eng["quantized_4bit"]:
    problems.append("the base model is not 4-bit")
if not str(eng["optimizer_class"]).startswith("bitsandbytes.") or eng["paged"] is not True:
    problems.append(f"optimizer {eng['optimizer_class']} (paged={eng['paged']}), not paged 8-bit")
first, last = rows[:3], rows[-3:]
if not sum(r["loss"] for r in last) < sum(r["loss"] for r in first):
    problems.append("the loss did not go down")
if problems:
    print("gpu_check: FAILED: " + "; ".join(problems))
    sys.exit(1)
print("gpu_check: OK")
EOF

echo "gpu_check: teacher engines on a random model of Qwen2.5-0.5B's shape"
"$PY" benchmarks/teacher_gpu.py --out "$OUT/teacher" --server "${SERVER:-vllm}"
