"""``EvaluateShard``: one array task of student evaluation (a submitit Checkpointable).

Same shard protocol as generation: resume from the shard file, append as completions finish,
marker last. Greedy decoding, so a preempted and resumed shard predicts exactly what an
uninterrupted one does. ``--engine server`` serves the student as generation serves the teacher.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from hpc.config import EvaluateConfig
from jobs.engine import ServerCheckpointable
from jobs.sharded import Session, record_head, run_configured_shard, set_threads


def student_record(rec: dict[str, Any], sample: int, completion: Any) -> dict[str, Any]:
    """One evaluation record; a completion that could not be produced scores as wrong."""
    from cot.answers import answers_match, extract_final_answer

    gold = rec.get("answer")
    out = record_head(rec, sample)
    if completion.error is not None:
        out.update(generated=None, pred=None, gold=gold, correct=False, error=completion.error)
        return out
    text = completion.text.lstrip()
    pred = extract_final_answer(text)
    out.update(
        generated=text,
        pred=pred,
        gold=gold,
        correct=gold is not None and answers_match(pred, gold),
    )
    return out


class EvaluateShard(ServerCheckpointable):
    """Score shard ``shard`` of the plan in ``RUN_DIR/<stage>`` (``evaluate`` or ``evaluate_base``).

    ``cfg.lora_model`` None scores the base model.
    """

    def __call__(self, cfg: EvaluateConfig, shard: int, stage: str = "evaluate") -> dict[str, Any]:
        from cot.models import check_adapter_dir, load_model
        from cot.prompts import STUDENT_TEMPLATE, as_prompt, load_template, prompt, resolve_format
        from jobs.engine import open_engine, stop_at_next_turn

        if cfg.lora_model:  # the task runs after the training ends, however it ended
            check_adapter_dir(cfg.lora_model)

        if cfg.engine == "hf":
            set_threads(cfg)
        template = load_template(STUDENT_TEMPLATE)

        def load() -> Any:
            model: Any = load_model(
                cfg.base_model, quant=cfg.quant, trust_remote_code=cfg.trust_remote_code
            )
            if cfg.lora_model:
                from peft import PeftModel

                model = PeftModel.from_pretrained(
                    model, cfg.lora_model, is_trainable=False, local_files_only=True
                )
                model.eval()
            return model

        @contextlib.contextmanager
        def session() -> Iterator[Session]:
            with open_engine(cfg, cfg.base_model, stage, shard, load_model=load) as (engine, tok):
                fmt = resolve_format(cfg.prompt_format, tok)
                stop_at_next_turn(engine, template, fmt)
                # The student learnt ``### Question: ... ### Answer:`` followed by a newline.
                yield engine, lambda rec: as_prompt(prompt(template, rec["question"]), fmt)

        return run_configured_shard(
            cfg, stage, shard, open_engine=session, to_record=student_record
        )
