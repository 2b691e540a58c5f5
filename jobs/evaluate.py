"""``EvaluateShard``: one array task of student evaluation (a submitit Checkpointable).

Same shard protocol as generation: resume from the shard file, append as completions finish,
marker last. Greedy by default; with ``--samples-per-question K`` and a temperature each record
key samples from its own seed, so a preempted and resumed shard predicts exactly what an
uninterrupted one does either way. ``--engine server`` serves the student as generation serves
the teacher. The same task scores the teacher on the test questions (``evaluate_teacher``),
prompted with the teacher's template.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from hpc.config import EvaluateConfig
from jobs.engine import ServerCheckpointable
from jobs.sharded import Session, gold_of, record_head, run_configured_shard, set_threads


def student_record(rec: dict[str, Any], sample: int, completion: Any) -> dict[str, Any]:
    """One evaluation record.

    ``gold`` is the input's answer reduced to its final answer when it is a worked solution
    (``#### 18``, a ``Final Answer:`` line, ``\boxed{}``: ``gold_reduced`` then says so). A
    record without gold is unscored (``correct`` None), never wrong; a completion that could not
    be produced scores as wrong.
    """
    from cot.answers import answers_match, extract_final_answer

    gold, reduced = gold_of(rec) or (None, False)
    out = record_head(rec, sample)
    if completion.error is not None:
        correct = False if gold is not None else None
        out.update(
            generated=None,
            pred=None,
            gold=gold,
            correct=correct,
            gold_reduced=reduced,
            error=completion.error,
        )
        return out
    text = completion.text.lstrip()
    pred = extract_final_answer(text)
    correct = answers_match(pred, gold) if gold is not None else None
    out.update(generated=text, pred=pred, gold=gold, correct=correct, gold_reduced=reduced)
    return out


class EvaluateShard(ServerCheckpointable):
    """Score shard ``shard`` of the plan in ``RUN_DIR/<stage>`` (``evaluate``, ``evaluate_base``).

    ``cfg.lora_model`` None scores the base model. With ``teacher`` the model is prompted as the
    teacher is in generation (``cfg.teacher_prompt_template``, chat where it has a template).
    """

    def __init__(self, teacher: bool = False):
        self.teacher = teacher

    def __call__(self, cfg: EvaluateConfig, shard: int, stage: str = "evaluate") -> dict[str, Any]:
        from cot.models import check_adapter_dir, load_model
        from cot.prompts import (
            STUDENT_TEMPLATE,
            as_prompt,
            load_template,
            prompt,
            resolve_format,
            teacher_prompt,
        )
        from jobs.engine import open_engine, stop_at_next_turn

        if cfg.lora_model:  # the task runs after the training ends, however it ended
            check_adapter_dir(cfg.lora_model)

        if cfg.engine == "hf":
            set_threads(cfg)
        template = load_template(cfg.teacher_prompt_template if self.teacher else STUDENT_TEMPLATE)

        def load() -> Any:
            model: Any = load_model(
                cfg.base_model,
                quant=cfg.quant,
                trust_remote_code=cfg.trust_remote_code,
                precision=cfg.precision,
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
                if self.teacher:
                    yield engine, lambda rec: teacher_prompt(template, rec["question"], fmt)
                else:
                    # The student learnt ``### Question: ... ### Answer:`` and a newline.
                    yield engine, lambda rec: as_prompt(prompt(template, rec["question"]), fmt)

        return run_configured_shard(
            cfg, stage, shard, open_engine=session, to_record=student_record
        )
