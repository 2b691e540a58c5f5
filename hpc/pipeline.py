"""``pipeline``: data -> generate -> merge -> train -> evaluate (+ base) -> merge -> report.

On SLURM every stage is submitted at once, each chained on the one before with ``afterok``;
the command prints the job ids and returns. A failed stage makes Slurm cancel the ones after it
(``kill-on-invalid-dep``), and ``status`` shows which. Locally the same stage callables run in
the foreground, in order. Rerunning the same command skips every stage that is complete and
reruns only what is missing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from hpc import config as C
from hpc import executor as E
from hpc import runs
from hpc.stage import submit_after, submit_sharded, wait_stage

TINY = Path("models/tiny")


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
            raise C.ConfigError(f"--set {section}.*: unknown stage (known: {', '.join(C.STAGES)})")
        for key, value in values.items():
            C.coerce(C.STAGES[section], key, value, f"--set {section}.{key}")
    return Stages(
        generate=load(C.GenerateConfig, "generate"),
        train=load(C.TrainConfig, "train"),
        evaluate=load(C.EvaluateConfig, "evaluate"),
        data=load(C.DataConfig, "data"),
        tiny=load(C.TinyModelsConfig, "tiny_models"),
    )


def _ensure_inputs(st: Stages) -> None:
    """Write the dataset if missing; build the tiny models when the config uses them."""
    from cot.dataset import write_splits

    for path in (st.generate.input, st.evaluate.input):
        if not Path(path).exists() and Path(path).parent == Path(st.data.out_dir):
            print(f"data: {path} missing, writing the dataset into {st.data.out_dir}")
            write_splits(Path(st.data.out_dir), seed=st.data.seed)
    wants_tiny = any(
        Path(p).resolve().is_relative_to(Path(st.tiny.out_dir).resolve())
        for p in (st.generate.teacher, st.train.student, st.evaluate.base_model)
    )
    if wants_tiny:
        from hpc.launch import cmd_tiny_models

        cmd_tiny_models(st.tiny, None)  # type: ignore[arg-type]  # a no-op when up to date


def run_pipeline(st: Stages) -> int:
    """Submit (SLURM) or run (local) every stage not yet complete."""
    from cot.models import check_model_dir, check_remote_code
    from hpc.train_stage import submit_train, train_complete
    from jobs.evaluate import EvaluateShard
    from jobs.generate import GenerateShard
    from jobs.report import Report

    run_dir = runs.make_run_dir(st.generate.run_dir)
    rd = str(run_dir)
    gen = dataclasses.replace(st.generate, run_dir=rd)
    train = dataclasses.replace(st.train, run_dir=rd)
    ev = dataclasses.replace(st.evaluate, run_dir=rd)
    kind = E.choose_cluster(gen.cluster)
    with runs.run_lock(run_dir):
        _ensure_inputs(st)
        print(f"pipeline: run folder {run_dir} ({kind})")

        def check_teacher() -> None:
            check_remote_code(check_model_dir(gen.teacher), gen.trust_remote_code)

        def check_student() -> None:
            check_remote_code(check_model_dir(ev.base_model), ev.trust_remote_code)

        # Validate everything that exists at submit time before anything is submitted.
        check_teacher()
        check_remote_code(check_model_dir(train.student), train.trust_remote_code)
        check_student()

        g = submit_sharded(
            "generate",
            gen,
            GenerateShard(),
            check_models=check_teacher,
            keep=gen.keep,
            samples=gen.samples_per_question,
            kind=kind,
        )
        train_data = train.data or str(run_dir / "generate" / "merged.jsonl")
        train = dataclasses.replace(train, data=train_data)
        train_out = Path(train.out_dir or run_dir / "train")
        if train_complete(train):
            print(f"train: already complete ({train_out})")
            train_deps: list[str] = []
        else:
            job, _ = submit_train(train, dependency=g.dependency, kind=kind)
            train_deps = [str(job.job_id).split("_")[0]] if job is not None else []
        ev = dataclasses.replace(ev, lora_model=ev.lora_model or str(train_out / "adapter"))
        e = submit_sharded(
            "evaluate",
            ev,
            EvaluateShard(),
            check_models=check_student,
            dependency=train_deps,
            kind=kind,
        )
        subs = [e]
        if ev.compare_base:
            base = dataclasses.replace(ev, lora_model=None, output=None)
            subs.append(
                submit_sharded(
                    "evaluate_base", base, EvaluateShard(), check_models=check_student, kind=kind
                )
            )
        deps = [d for s in subs for d in s.dependency]
        report_md = run_dir / "results" / "report.md"
        if deps or not report_md.exists():
            job, _ = submit_after(
                ev, run_dir, "report", Report(), (rd, ev.compare_base), deps, kind
            )
        else:
            job = None
            print("report: already written")
    if kind == "slurm" and job is not None:
        print(f"pipeline submitted; follow it with: python -m hpc.launch status {run_dir}")
        if not gen.wait:
            return 0
        for s in subs:
            if s.merge_job is not None:
                wait_stage(s)
        job.result()
    print(f"report: {report_md}")
    print(report_md.read_text())
    return 0


def parse_sets(items: list[str]) -> dict[str, dict[str, Any]]:
    """``--set train.epochs=1`` -> {"train": {"epochs": 1}} (values parsed as YAML scalars)."""
    import yaml

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, eq, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not eq or not dot or not name:
            raise C.ConfigError(f"--set {item!r}: expected STAGE.KEY=VALUE, e.g. train.epochs=1")
        out.setdefault(section.replace("-", "_"), {})[name.replace("-", "_")] = yaml.safe_load(
            value
        )
    return out
