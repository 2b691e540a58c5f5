"""Training throughput: our length-grouped batches against the seed's padding to max_length.

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/training.py \
        [--data FILE] [--max-length 1024] [--batch-size 8] [--steps 16] [--skip-distributed]

Part 1 (one process, same records, same LoRA student, same optimizer): the fraction of non-pad
tokens and the real (non-pad) tokens/s of
  - ours: length-grouped micro-batches padded to their own longest example, and
  - the seed's: shuffled batches padded to --max-length,
and the ratio. Goals: >= 90% non-pad tokens, >= 3x tokens/s.

Part 2: the median optimizer-step time of 2-process ZeRO-2 against 2-process DDP, both through
``python -m hpc.launch train --cluster local`` (read from each run's metrics.jsonl).

Default data: the question set's reference solutions (data/raw_questions.jsonl, ``cot`` taken
from ``reference_cot``), so it runs without a generate stage first; ``--data`` takes a
generate output (``question`` + ``cot``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cot import training as T  # noqa: E402

STUDENT = REPO / "models" / "tiny" / "student"


def load_records(path: Path) -> tuple[list[dict[str, Any]], Path]:
    """Records with question + cot, and a file holding them (for the CLI runs)."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    recs = [
        {"question": r["question"], "cot": r.get("cot") or r["reference_cot"], "line": i + 1}
        for i, r in enumerate(rows)
    ]
    if all("cot" in r for r in rows):
        return recs, path
    fd, tmp = tempfile.mkstemp(prefix="cothpc-bench-", suffix=".jsonl")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        for r in recs:
            fh.write(json.dumps({"question": r["question"], "cot": r["cot"]}) + "\n")
    return recs, Path(tmp)


def batches(order: list[int], size: int) -> list[list[int]]:
    return [order[i : i + size] for i in range(0, len(order), size)]


def tokens_per_s(
    model: Any,
    examples: list[dict[str, Any]],
    order: list[int],
    batch_size: int,
    steps: int,
    pad_to: int | None,
    pad_id: int,
) -> tuple[float, float]:
    """(real tokens/s, seconds per step) over ``steps`` steps after 2 warm-up steps."""
    import torch

    collate = T.PadCollator(pad_id, pad_to=pad_to)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    todo = batches(order, batch_size)[: steps + 2]
    real, elapsed = 0, 0.0
    for i, idx in enumerate(todo):
        batch = collate([examples[j] for j in idx])
        t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        dt = time.perf_counter() - t0
        if i >= 2:  # warm-up: allocator and kernel selection
            real += int(batch["attention_mask"].sum())
            elapsed += dt
    n = max(1, len(todo) - 2)
    return real / elapsed, elapsed / n


def part1(args: argparse.Namespace, recs: list[dict[str, Any]]) -> None:
    import torch

    from cot.models import load_model, load_tokenizer

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    tok = load_tokenizer(args.student, padding_side="right")
    examples, stats = T.build_examples(tok, recs, args.max_length, "truncate")
    lengths = [e["length"] for e in examples]
    grouped = T.grouped_order(lengths, args.batch_size, seed=0)
    shuffled = list(range(len(examples)))
    random.Random(0).shuffle(shuffled)
    frac_ours = T.non_pad_fraction(lengths, grouped, args.batch_size)
    frac_seed = T.non_pad_fraction(lengths, shuffled, args.batch_size, pad_to=args.max_length)
    print(stats.describe(args.max_length))
    print(
        f"{len(examples)} examples, mean length {statistics.mean(lengths):.0f} tokens, "
        f"batch {args.batch_size}, max_length {args.max_length}"
    )
    results = {}
    for name, order, pad_to in (
        ("ours (length-grouped)", grouped, None),
        (f"seed (pad to {args.max_length})", shuffled, args.max_length),
    ):
        base = load_model(args.student, quant="none", device="cpu")
        model = T.prepare_lora_model(
            base,
            r=8,
            lora_alpha=16,
            lora_dropout=0.05,
            quantized=False,
            gradient_checkpointing=False,
            seed=0,
        )
        results[name] = tokens_per_s(
            model, examples, order, args.batch_size, args.steps, pad_to, tok.pad_token_id
        )
    (ours_tps, ours_step), (seed_tps, seed_step) = results.values()
    print()
    print(f"{'':28} {'non-pad tokens':>15} {'tokens/s':>10} {'s/step':>8}")
    print(f"{'ours (length-grouped)':28} {frac_ours:>14.1%} {ours_tps:>10.0f} {ours_step:>8.3f}")
    seed_name = f"seed (pad to {args.max_length})"
    print(f"{seed_name:28} {frac_seed:>14.1%} {seed_tps:>10.0f} {seed_step:>8.3f}")
    ratio = ours_tps / seed_tps
    print(f"tokens/s ratio: {ratio:.1f}x  (goals: >= 90% non-pad, >= 3x)")
    ok = frac_ours >= 0.9 and ratio >= 3
    print("part 1:", "goals met" if ok else "GOALS NOT MET")


def step_time(args: argparse.Namespace, data: Path, deepspeed: str, run_dir: Path) -> float:
    """Median step time of a 2-process local run through the CLI."""
    cfg = run_dir.with_name(f"{run_dir.name}.yaml")  # beside the run folder, not in it
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text("# defaults + flags only\n")
    argv = [
        sys.executable, "-m", "hpc.launch", "train", "--config", str(cfg),
        "--cluster", "local", "--tasks-per-node", "2", "--cpus-per-task", "1",
        "--student", str(args.student), "--data", str(data), "--run-dir", str(run_dir),
        "--deepspeed", deepspeed, "--max-steps", str(args.dist_steps),
        "--save-steps", str(10 * args.dist_steps), "--logging-steps", "1",
        "--per-device-train-batch-size", str(args.batch_size),
        "--gradient-accumulation-steps", "1", "--max-length", "256",
        "--quant", "none", "--optim", "adamw_torch",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    res = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{res.stdout}\n{res.stderr}")
    rows = [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").open()]
    return statistics.median(r["step_time_s"] for r in rows[2:])


def part2(args: argparse.Namespace, data: Path) -> None:
    root = Path(tempfile.mkdtemp(prefix="cothpc-train-bench-"))
    zero2 = step_time(args, data, str(REPO / "templates" / "ds_zero2.json"), root / "zero2")
    ddp = step_time(args, data, "", root / "ddp")
    print()
    print(f"2 processes, {args.dist_steps} steps, micro-batch {args.batch_size}, gloo on CPU:")
    print(f"  ZeRO-2 median step {zero2 * 1000:.0f} ms")
    print(f"  DDP    median step {ddp * 1000:.0f} ms")
    print(f"  ZeRO-2 / DDP = {zero2 / ddp:.2f}")
    print(f"  runs in {root}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=REPO / "data" / "raw_questions.jsonl")
    p.add_argument("--student", type=Path, default=STUDENT)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--dist-steps", type=int, default=30)
    p.add_argument("--skip-distributed", action="store_true")
    args = p.parse_args()
    recs, data = load_records(args.data)
    part1(args, recs)
    if not args.skip_distributed:
        part2(args, data)


if __name__ == "__main__":
    main()
