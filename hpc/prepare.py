"""Inputs a run can make for itself: the deterministic dataset and the tiny offline models."""

from __future__ import annotations

import fcntl
import json
import logging
from pathlib import Path

from hpc import config as C

log = logging.getLogger(__name__)


def build_tiny_models(cfg: C.TinyModelsConfig) -> None:
    """Build the tiny teacher and student offline; a no-op when the recipe is unchanged.

    Whatever shapes the models (seeds, steps, data, prompt) is stamped in ``build.json``, so a
    changed recipe rebuilds them. A second builder waits on the lock, then finds them built.
    """
    from cot.dataset import write_splits
    from cot.models import TINY_STUDENT, TINY_TEACHER
    from cot.models import build_tiny_models as build
    from cot.prompts import TEACHER_TEMPLATE, load_template
    from cot.records import atomic_write_text, read_questions
    from hpc.shards import sha256_file

    out = Path(cfg.out_dir)
    train_path = Path(cfg.data_dir) / "raw_questions.jsonl"
    if not train_path.exists():
        write_splits(Path(cfg.data_dir), seed=0)
    recipe = {
        "seed": cfg.seed,
        "teacher_steps": cfg.teacher_steps,
        "student_steps": cfg.student_steps,
        "teacher": TINY_TEACHER,
        "student": TINY_STUDENT,
        "data_sha256": sha256_file(train_path),
        "prompt_sha256": sha256_file(TEACHER_TEMPLATE),
        "builder": 3,
    }
    stamp = out / "build.json"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not cfg.force and stamp.exists() and json.loads(stamp.read_text()) == recipe:
            log.info(f"tiny models already in {out} (use --force to rebuild)")
            return
        stats = build(
            out,
            read_questions(train_path),
            seed=cfg.seed,
            teacher_steps=cfg.teacher_steps,
            student_steps=cfg.student_steps,
            prompt_template=load_template(TEACHER_TEMPLATE),
        )
        atomic_write_text(stamp, json.dumps(recipe, indent=1))
    for name, s in stats.items():
        log.info(
            f"{name}: {out / name}  params={s['params']:,}  steps={s['steps']}  "
            f"loss {s['first_loss'] or 0:.2f} -> {s['last_loss'] or 0:.2f}  {s['seconds']}s"
        )


def ensure_inputs(
    inputs: list[str], data: C.DataConfig, tiny: C.TinyModelsConfig, models: list[str]
) -> None:
    """Write the dataset when an input of it is missing; build the tiny models when used."""
    from cot.dataset import write_splits

    for path in inputs:
        if not Path(path).exists() and Path(path).resolve().parent == Path(data.out_dir).resolve():
            log.info(f"data: {path} missing, writing the dataset into {data.out_dir}")
            write_splits(Path(data.out_dir), seed=data.seed)
    tiny_root = Path(tiny.out_dir).resolve()
    if any(Path(p).resolve().is_relative_to(tiny_root) for p in models):
        build_tiny_models(tiny)
