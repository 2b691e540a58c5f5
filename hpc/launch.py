"""The ``cot-hpc`` command line: ``python -m hpc.launch <command> [--config FILE] [flags]``.

Flags are generated from the stage dataclasses in :mod:`hpc.config`, in both spellings
(``--max-new-tokens`` and the seed's ``--max_new_tokens``). Nothing heavy is imported here:
torch and transformers load only inside the commands that need them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpc import config as C
from hpc.config import ConfigError

Handler = Callable[[Any, argparse.Namespace], int]


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    for name, f in C.fields_of(cls).items():
        base, _ = C._type_of(cls, name)
        flags = [f"--{name.replace('_', '-')}"]
        if "_" in name:
            flags.append(f"--{name}")
        flags += list(f.metadata.get("aliases", ()))
        default = f.default
        help_ = f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%")
        if base is bool:
            parser.add_argument(
                *flags,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_,
            )
        else:
            parser.add_argument(
                *flags,
                dest=name,
                type=base,
                default=argparse.SUPPRESS,
                choices=f.metadata.get("choices"),
                metavar=name.upper() if not f.metadata.get("choices") else None,
                help=help_,
            )


def _config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=str(C.DEFAULT_CONFIG),
        help="YAML file of sections (cluster:, generate:, ...); flags override it "
        "(default: templates/demo.yaml, tiny models)",
    )


def overrides(ns: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The parsed flags that are fields of the config dataclass ``cls``."""
    names = C.fields_of(cls)
    return {k: v for k, v in vars(ns).items() if k in names}


# --------------------------------------------------------------------------- commands


def cmd_data(cfg: C.DataConfig, ns: argparse.Namespace) -> int:
    """Write the deterministic question set."""
    from cot.dataset import write_splits

    train, test = write_splits(Path(cfg.out_dir), seed=cfg.seed)
    print(f"wrote {train} and {test}")
    return 0


def cmd_tiny_models(cfg: C.TinyModelsConfig, ns: argparse.Namespace) -> int:
    """Build the tiny teacher and student offline."""
    import fcntl
    import json

    from cot.dataset import write_splits
    from cot.models import TINY_STUDENT, TINY_TEACHER, build_tiny_models
    from cot.prompts import TEACHER_TEMPLATE, load_template
    from cot.records import atomic_write_text, read_questions
    from hpc.shards import sha256_file

    out = Path(cfg.out_dir)
    train_path = Path(cfg.data_dir) / "raw_questions.jsonl"
    if not train_path.exists():
        write_splits(Path(cfg.data_dir), seed=0)
    # Rebuild whenever anything that shapes the models changed, not only when they're missing.
    build = {
        "seed": cfg.seed,
        "teacher_steps": cfg.teacher_steps,
        "student_steps": cfg.student_steps,
        "teacher": TINY_TEACHER,
        "student": TINY_STUDENT,
        "data_sha256": sha256_file(train_path),
        "prompt_sha256": sha256_file(TEACHER_TEMPLATE),
        "builder": 2,
    }
    stamp = out / "build.json"
    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / ".build.lock", "w")  # noqa: SIM115 - held until the build is done
    fcntl.flock(lock, fcntl.LOCK_EX)  # a second builder waits, then finds the models built
    if not cfg.force and stamp.exists() and json.loads(stamp.read_text()) == build:
        print(f"tiny models already in {out} (use --force to rebuild)")
        return 0
    records = read_questions(train_path)
    stats = build_tiny_models(
        out,
        records,
        seed=cfg.seed,
        teacher_steps=cfg.teacher_steps,
        student_steps=cfg.student_steps,
        prompt_template=load_template(TEACHER_TEMPLATE),
    )
    atomic_write_text(stamp, json.dumps(build, indent=1))
    for name, s in stats.items():
        print(
            f"{name}: {out / name}  params={s['params']:,}  steps={s['steps']}  "
            f"loss {s['first_loss'] or 0:.2f} -> {s['last_loss'] or 0:.2f}  {s['seconds']}s"
        )
    return 0


def cmd_download(cfg: C.DownloadConfig, ns: argparse.Namespace) -> int:
    """Fetch models from the hub into models/teacher and models/student (login node only)."""
    import os

    if not cfg.teacher and not cfg.student:
        raise ConfigError("download: give --teacher ID and/or --student ID")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        raise ConfigError(
            "download: HF_HUB_OFFLINE is set, so the hub may not be contacted; "
            "run `download` on a login node with network access"
        )
    from huggingface_hub import snapshot_download

    for role, repo in (("teacher", cfg.teacher), ("student", cfg.student)):
        if not repo:
            continue
        dest = Path(cfg.out_dir) / role
        print(f"downloading {repo} -> {dest}")
        snapshot_download(repo_id=repo, revision=cfg.revision, local_dir=str(dest))
    print("done: compute nodes load these folders with local_files_only=True")
    return 0


def cmd_generate(cfg: C.GenerateConfig, ns: argparse.Namespace) -> int:
    """Sharded teacher generation, then the verified merge."""
    from cot.models import check_model_dir, check_remote_code
    from cot.prompts import load_template
    from hpc.stage import launch_sharded
    from jobs.generate import GenerateShard

    def check_models() -> None:
        check_remote_code(check_model_dir(cfg.teacher), cfg.trust_remote_code)
        load_template(cfg.prompt_template)

    return launch_sharded(
        "generate",
        cfg,
        GenerateShard(),
        check_models=check_models,
        keep=cfg.keep,
        samples=cfg.samples_per_question,
    )


def cmd_evaluate(cfg: C.EvaluateConfig, ns: argparse.Namespace) -> int:
    """Sharded scoring of the student (and optionally the base student), then the report."""
    import dataclasses

    from cot.models import check_adapter_dir, check_model_dir, check_remote_code
    from hpc import runs
    from hpc.stage import submit_after, submit_sharded, wait_stage
    from jobs.evaluate import EvaluateShard
    from jobs.report import Report

    def check_models() -> None:
        check_remote_code(check_model_dir(cfg.base_model), cfg.trust_remote_code)
        if cfg.lora_model:
            check_adapter_dir(cfg.lora_model)

    run_dir = runs.make_run_dir(cfg.run_dir)
    cfg = dataclasses.replace(cfg, run_dir=str(run_dir))
    with runs.run_lock(run_dir):
        subs = [submit_sharded("evaluate", cfg, EvaluateShard(), check_models=check_models)]
        if cfg.compare_base:
            base_cfg = dataclasses.replace(cfg, lora_model=None, output=None)
            subs.append(
                submit_sharded(
                    "evaluate_base", base_cfg, EvaluateShard(), check_models=check_models
                )
            )
        deps = [d for s in subs for d in s.dependency]
        job, report = submit_after(
            cfg, run_dir, "report", Report(), (str(run_dir), cfg.compare_base), deps, subs[0].kind
        )
    if job is not None:
        if not cfg.wait:
            return 0
        for sub in subs:
            if sub.merge_job is not None:
                wait_stage(sub)
        report = job.result()
    print(f"report: {run_dir / 'results' / 'report.md'}")
    o = report["student"]["overall"]
    print(
        f"accuracy {o['accuracy']:.1%}  format compliance {o['format_compliance']:.1%}  n={o['n']}"
    )
    return 0


def cmd_train(cfg: C.TrainConfig, ns: argparse.Namespace) -> int:
    """Multi-node LoRA training (one job, nodes x tasks_per_node processes)."""
    from hpc.train_stage import launch_train

    return launch_train(cfg)


def cmd_pipeline(ns: argparse.Namespace) -> int:
    """Every stage as one chain of dependent jobs (SLURM) or in the foreground (local)."""
    from hpc.pipeline import parse_sets, resolve, run_pipeline

    common = overrides(ns, C.ClusterFields)
    return run_pipeline(resolve(ns.config, parse_sets(ns.set or []), common))


def cmd_merge(ns: argparse.Namespace) -> int:
    """Merge a stage's shards by hand (normally a dependent job does it)."""
    import yaml

    from jobs.merge import Merge, describe

    run_dir = Path(ns.run_dir)
    resolved = (
        yaml.safe_load((run_dir / "config.yaml").read_text())
        if (run_dir / "config.yaml").exists()
        else {}
    )
    stage_cfg = (resolved or {}).get(ns.stage, {})
    output = ns.output or stage_cfg.get("output")
    keep = ns.keep or stage_cfg.get("keep", "all")
    counts = Merge()(str(run_dir), ns.stage, [output] if output else [], keep)
    print(describe(counts))
    return 0


def cmd_status(ns: argparse.Namespace) -> int:
    """Where a run stands."""
    import json

    from hpc.status import collect, render

    data = collect(Path(ns.run_dir))
    print(json.dumps(data, indent=1) if ns.json else render(data))
    return 1 if any(r.get("failed") for r in data["stages"].values()) else 0


COMMANDS: dict[str, tuple[str, type, Handler, str]] = {
    "data": ("data", C.DataConfig, cmd_data, "write the synthetic question set"),
    "tiny-models": (
        "tiny_models",
        C.TinyModelsConfig,
        cmd_tiny_models,
        "build a tiny teacher and student offline",
    ),
    "download": (
        "download",
        C.DownloadConfig,
        cmd_download,
        "fetch real models on a login node (the only networked command)",
    ),
    "generate": (
        "generate",
        C.GenerateConfig,
        cmd_generate,
        "sharded, resumable teacher generation as one job array, then a verified merge",
    ),
    "train": (
        "train",
        C.TrainConfig,
        cmd_train,
        "multi-node LoRA training (DeepSpeed ZeRO-2), resumable from complete checkpoints",
    ),
    "evaluate": (
        "evaluate",
        C.EvaluateConfig,
        cmd_evaluate,
        "sharded evaluation of the student, merged into a report",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every command."""
    parser = argparse.ArgumentParser(
        prog="cot-hpc",
        description="SLURM-native chain-of-thought distillation: "
        "generate -> merge -> train -> evaluate, resumable at every step.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, cls, _, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        _config_flag(p)
        _add_dataclass_flags(p, cls)
    p = sub.add_parser(
        "pipeline",
        help="data -> generate -> merge -> train -> evaluate -> report, as dependent jobs",
        description="Submit every stage at once (SLURM, afterok chain) or run them in order "
        "(local). Rerunning skips complete stages. Cluster flags apply to every stage; "
        "--set STAGE.KEY=VALUE overrides one stage, e.g. --set generate.shards=8.",
    )
    _config_flag(p)
    _add_dataclass_flags(p, C.ClusterFields)
    p.add_argument("--set", action="append", metavar="STAGE.KEY=VALUE", help="per-stage override")
    p = sub.add_parser("merge", help="merge a stage's completed shards (checks every record)")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--stage", default="generate", choices=("generate", "evaluate", "evaluate_base"))
    p.add_argument("--output", help="also copy the merged file here (atomically)")
    p.add_argument("--keep", choices=("all", "correct"), help="default: the launch's --keep")
    p = sub.add_parser("status", help="where a run stands: shards, records, requeues, jobs")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse, resolve the config, run the command. Errors exit non-zero with one clear line."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if ns.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from cot.models import ModelError
    from cot.records import RecordError
    from hpc.runs import RunLockedError
    from hpc.shards import PlanError
    from hpc.stage import StageFailed

    try:
        if ns.command == "merge":
            return cmd_merge(ns)
        if ns.command == "status":
            return cmd_status(ns)
        if ns.command == "pipeline":
            return cmd_pipeline(ns)
        section, cls, handler, _ = COMMANDS[ns.command]
        cfg: Any = C.load_config(cls, section, ns.config, overrides(ns, cls))
        return handler(cfg, ns)
    except (ConfigError, RecordError, ModelError, PlanError, RunLockedError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StageFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
