"""``GenerateShard``: one array task of teacher generation (a submitit Checkpointable).

Preemption or timeout: submitit's USR2 handler calls ``checkpoint()``, which resubmits this same
callable with the same arguments; the state lives in the shard file, so the rerun resumes from
disk. A bare ``scontrol requeue`` skips ``checkpoint()`` and lands in the same on-disk resume.
"""

from __future__ import annotations

from typing import Any

import submitit

from hpc.config import GenerateConfig
from jobs.sharded import run_configured_shard, set_threads

STAGE = "generate"


class GenerateShard(submitit.helpers.Checkpointable):
    """Generate teacher traces for shard ``shard`` of the plan in ``RUN_DIR/generate``."""

    def __call__(self, cfg: GenerateConfig, shard: int, stage: str = STAGE) -> dict[str, Any]:
        from cot.answers import answers_match, extract_final_answer
        from cot.generation import generate_batch
        from cot.models import load_model, load_tokenizer
        from cot.prompts import load_template, prompt

        set_threads(cfg)
        template = load_template(cfg.prompt_template)

        def load() -> tuple[Any, Any]:
            tok = load_tokenizer(cfg.teacher, trust_remote_code=cfg.trust_remote_code)
            model = load_model(
                cfg.teacher, quant=cfg.quant, trust_remote_code=cfg.trust_remote_code
            )
            return model, tok

        def generate(model: Any, tok: Any, prompts: list[str], seed: int) -> tuple[list[str], int]:
            return generate_batch(
                model,
                tok,
                prompts,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
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

        return run_configured_shard(
            cfg,
            stage,
            shard,
            load=load,
            prompt_of=lambda rec: prompt(template, rec["question"]),
            generate=generate,
            to_record=to_record,
        )
