"""``EvaluateShard``: one array task of student evaluation (a submitit Checkpointable).

Same shard protocol as generation: resume from the shard file, append per batch, marker last.
Greedy decoding, so a preempted and resumed shard predicts exactly what an uninterrupted one does.
"""

from __future__ import annotations

from typing import Any

import submitit

from hpc.config import EvaluateConfig
from jobs.sharded import run_configured_shard, set_threads


class EvaluateShard(submitit.helpers.Checkpointable):
    """Score shard ``shard`` of the plan in ``RUN_DIR/<stage>`` (``evaluate`` or ``evaluate_base``).

    ``cfg.lora_model`` None scores the base model.
    """

    def __call__(self, cfg: EvaluateConfig, shard: int, stage: str = "evaluate") -> dict[str, Any]:
        from cot.answers import answers_match, extract_final_answer
        from cot.generation import generate_batch
        from cot.models import load_model, load_tokenizer
        from cot.prompts import student_prompt

        set_threads(cfg)

        def load() -> tuple[Any, Any]:
            tok = load_tokenizer(cfg.base_model, trust_remote_code=cfg.trust_remote_code)
            model: Any = load_model(
                cfg.base_model, quant=cfg.quant, trust_remote_code=cfg.trust_remote_code
            )
            if cfg.lora_model:
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, cfg.lora_model, is_trainable=False)
                model.eval()
            return model, tok

        def generate(model: Any, tok: Any, prompts: list[str], seed: int) -> tuple[list[str], int]:
            return generate_batch(model, tok, prompts, max_new_tokens=cfg.max_new_tokens)

        def to_record(rec: dict[str, Any], sample: int, text: str) -> dict[str, Any]:
            pred = extract_final_answer(text)
            gold = rec.get("answer")
            return {
                "id": rec["id"],
                "sample": sample,
                "category": rec.get("category"),
                "question": rec["question"],
                "generated": text,
                "pred": pred,
                "gold": gold,
                "correct": gold is not None and answers_match(pred, gold),
            }

        return run_configured_shard(
            cfg,
            stage,
            shard,
            load=load,
            prompt_of=lambda rec: student_prompt(rec["question"]),
            generate=generate,
            to_record=to_record,
        )
