"""``GenerateShard``: one array task of teacher generation (a submitit Checkpointable).

Preemption or timeout: submitit's USR2 handler calls ``checkpoint()``, which resubmits this same
callable with the same arguments; the state lives in the shard file, so the rerun resumes from
disk. A bare ``scontrol requeue`` skips ``checkpoint()`` and lands in the same on-disk resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import submitit

from jobs.sharded import run_shard

STAGE = "generate"


class GenerateShard(submitit.helpers.Checkpointable):
    """Generate teacher traces for shard ``shard`` of the plan in ``RUN_DIR/generate``."""

    def __call__(self, cfg: dict[str, Any], shard: int, stage: str = STAGE) -> dict[str, Any]:
        import torch

        from cot.answers import answers_match, extract_final_answer
        from cot.generation import generate_batch
        from cot.models import load_model, load_tokenizer
        from cot.prompts import load_template, prompt

        torch.set_num_threads(max(1, int(cfg["cpus_per_task"])))
        template = load_template(cfg["prompt_template"])

        def load() -> tuple[Any, Any]:
            tok = load_tokenizer(cfg["teacher"], trust_remote_code=cfg["trust_remote_code"])
            model = load_model(
                cfg["teacher"], quant=cfg["quant"], trust_remote_code=cfg["trust_remote_code"]
            )
            return model, tok

        def generate(model: Any, tok: Any, prompts: list[str], seed: int) -> tuple[list[str], int]:
            return generate_batch(
                model,
                tok,
                prompts,
                max_new_tokens=cfg["max_new_tokens"],
                temperature=cfg["temperature"],
                top_p=cfg["top_p"],
                seed=seed,
            )

        def to_record(rec: dict[str, Any], sample: int, text: str) -> dict[str, Any]:
            pred = extract_final_answer(text)
            out = {
                "id": rec["id"],
                "sample": sample,
                "category": rec.get("category"),
                "question": rec["question"],
                "cot": text,
                "teacher_answer": pred,
            }
            if "answer" in rec:
                out["gold"] = rec["answer"]
                out["correct"] = answers_match(pred, rec["answer"])
            return out

        return run_shard(
            Path(cfg["run_dir"]) / stage,
            shard,
            input_path=cfg["input"],
            start_index=cfg["start_index"],
            num_samples=cfg["num_samples"],
            batch_size=cfg["batch_size"],
            seed=cfg["seed"],
            load=load,
            prompt_of=lambda rec: prompt(template, rec["question"]),
            generate=generate,
            to_record=to_record,
        )
