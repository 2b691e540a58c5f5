"""``GenerateShard``: one array task of teacher generation (a submitit Checkpointable).

Preemption or timeout: submitit's USR2 handler calls ``checkpoint()``, which resubmits this same
callable with the same arguments; the state lives in the shard file, so the rerun resumes from
disk. A bare ``scontrol requeue`` skips ``checkpoint()`` and lands in the same on-disk resume.
With ``--engine server`` the task's inference server is stopped in ``checkpoint()``, before the
requeue, and killed on every other way out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from hpc.config import GenerateConfig
from jobs.engine import ServerCheckpointable
from jobs.sharded import Session, gold_of, record_head, run_configured_shard, set_threads

STAGE = "generate"


def teacher_record(rec: dict[str, Any], sample: int, completion: Any) -> dict[str, Any]:
    """One generation record; a completion the engine could not produce keeps its reason."""
    from cot.answers import answers_match, extract_final_answer

    out = record_head(rec, sample)
    gold = gold_of(rec)
    if completion.error is not None:
        out.update(cot=None, teacher_answer=None, error=completion.error)
        if gold is not None:
            out.update(gold=gold[0], gold_reduced=gold[1], correct=False)
        return out
    text = completion.text.lstrip()
    pred = extract_final_answer(text)
    out.update(cot=text, teacher_answer=pred)
    if gold is not None:
        out.update(gold=gold[0], gold_reduced=gold[1], correct=answers_match(pred, gold[0]))
    return out


class GenerateShard(ServerCheckpointable):
    """Generate teacher traces for shard ``shard`` of the plan in ``RUN_DIR/generate``."""

    def __call__(self, cfg: GenerateConfig, shard: int, stage: str = STAGE) -> dict[str, Any]:
        from cot.models import load_model
        from cot.prompts import load_template, resolve_format, teacher_prompt
        from jobs.engine import open_engine, stop_at_next_turn

        if cfg.engine == "hf":
            set_threads(cfg)
        template = load_template(cfg.prompt_template)

        @contextlib.contextmanager
        def session() -> Iterator[Session]:
            def load() -> Any:
                return load_model(
                    cfg.teacher,
                    quant=cfg.quant,
                    trust_remote_code=cfg.trust_remote_code,
                    precision=cfg.precision,
                )

            with open_engine(cfg, cfg.teacher, stage, shard, load_model=load) as (engine, tok):
                fmt = resolve_format(cfg.prompt_format, tok)
                stop_at_next_turn(engine, template, fmt)
                yield engine, lambda rec: teacher_prompt(template, rec["question"], fmt)

        return run_configured_shard(
            cfg, stage, shard, open_engine=session, to_record=teacher_record
        )
