"""``pipeline``: data -> generate -> merge -> train -> evaluate (+ base) -> merge -> report.

The pipeline is the list of every stage, run through the same runner as a single command. On
SLURM every stage is submitted at once, each depending on the one before (a failed stage makes
Slurm cancel the ones after it, and ``status`` shows which); the command prints the job ids and
returns. Locally the same stage callables run in the foreground, in order. Rerunning the same
command skips every stage that is complete and reruns only what is missing.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from hpc import config as C
from hpc.errors import ConfigError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Stages:
    """The resolved config of every stage, sharing one run folder and cluster kind."""

    generate: C.GenerateConfig
    train: C.TrainConfig
    evaluate: C.EvaluateConfig
    data: C.DataConfig
    tiny: C.TinyModelsConfig


def resolve(
    config_file: str | None, sets: dict[str, dict[str, Any]], common: dict[str, Any]
) -> Stages:
    """Load each stage's section; ``common`` flags (run dir, cluster...) apply to every stage."""

    def load(cls: type, name: str) -> Any:
        names = C.fields_of(cls)
        over = {k: v for k, v in common.items() if k in names}
        over.update(sets.get(name, {}))
        return C.load_config(cls, name, config_file, over)

    for section, values in sets.items():
        if section not in C.STAGES:
            raise ConfigError(f"--set {section}.*: unknown stage (known: {', '.join(C.STAGES)})")
        for key, value in values.items():
            C.coerce(C.STAGES[section], key, value, f"--set {section}.{key}")
    return Stages(
        generate=load(C.GenerateConfig, "generate"),
        train=load(C.TrainConfig, "train"),
        evaluate=load(C.EvaluateConfig, "evaluate"),
        data=load(C.DataConfig, "data"),
        tiny=load(C.TinyModelsConfig, "tiny_models"),
    )


def stages_of(st: Stages) -> list[Any]:
    """Every stage of the pipeline, in one run folder, each after the one it reads."""
    from hpc.stages import GenerateStage, TrainStage, evaluation_stages

    rd = str(Path(st.generate.run_dir).resolve())
    train = TrainStage(dataclasses.replace(st.train, run_dir=rd))
    ev = dataclasses.replace(
        st.evaluate, run_dir=rd, lora_model=st.evaluate.lora_model or str(train.out.adapter)
    )
    gen = GenerateStage(dataclasses.replace(st.generate, run_dir=rd))
    teacher = None
    if ev.score_teacher and not ev.teacher:
        teacher = teacher_of(st.generate, ev)
        ev = dataclasses.replace(ev, teacher=teacher.base_model)
    return [gen, train, *evaluation_stages(ev, after=("train",), teacher=teacher)]


def teacher_of(gen: C.GenerateConfig, ev: C.EvaluateConfig) -> C.EvaluateConfig:
    """The config that scores generate's teacher on the test questions: the test questions,
    shards, samples and decoding of ``evaluate``; the model, prompt, prompt format, answer
    length, engine (a server included) and resources of ``generate``."""
    from hpc.stages import teacher_config

    from_gen = {
        name: getattr(gen, name)
        for cls in (C.ClusterFields, C.ModelFields, C.EngineFields)
        for name in C.fields_of(cls)
        if name not in ("run_dir", "wait")  # one run folder; the pipeline decides the waiting
    }
    scored = dataclasses.replace(
        ev, teacher=gen.teacher, teacher_prompt_template=gen.prompt_template
    )
    return dataclasses.replace(
        teacher_config(scored),
        **from_gen,
        max_new_tokens=gen.max_new_tokens,
        batch_size=gen.batch_size,
    )


def run_pipeline(st: Stages) -> int:
    """Submit (SLURM) or run (local) every stage not yet complete."""
    from hpc.prepare import ensure_inputs
    from hpc.stages import report_text, run_stages

    stages = stages_of(st)
    gen, train, ev = stages[0].cfg, stages[1].cfg, stages[2].cfg

    def prepare() -> None:
        ensure_inputs(
            [gen.input, ev.input],
            st.data,
            st.tiny,
            [gen.teacher, train.student, ev.base_model, *([ev.teacher] if ev.teacher else [])],
        )
        log.info(f"pipeline: run folder {gen.run_dir}")

    def submitted() -> None:
        log.info(f"pipeline submitted; follow it with: python -m hpc.launch status {gen.run_dir}")

    out = run_stages(stages, gen, wait=gen.wait, before=prepare, on_queued=submitted)
    if "report" in out.results:
        print(report_text(out.results["report"], full=True))
    return 0


def parse_sets(items: list[str]) -> dict[str, dict[str, Any]]:
    """``--set train.epochs=1`` -> {"train": {"epochs": 1}} (values parsed as YAML scalars)."""
    import yaml

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, eq, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not eq or not dot or not name:
            raise ConfigError(f"--set {item!r}: expected STAGE.KEY=VALUE, e.g. train.epochs=1")
        out.setdefault(section.replace("-", "_"), {})[name.replace("-", "_")] = yaml.safe_load(
            value
        )
    return out
