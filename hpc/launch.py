"""The ``cot-hpc`` command line: ``python -m hpc.launch <command> [--config FILE] [flags]``.

Flags are generated from the stage dataclasses in :mod:`hpc.config`, in both spellings
(``--max-new-tokens`` and the seed's ``--max_new_tokens``). Nothing heavy is imported here:
torch and transformers load only inside the commands that need them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpc import config as C
from hpc.errors import ConfigError
from hpc.layout import SHARDED_STAGES

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
        default=C.default_config(),
        help="YAML file of sections (cluster:, generate:, ...); flags override it (default: "
        f"${C.CONFIG_ENV}, else none: the seed's hyperparameters; the tiny-model demo "
        "settings are --config templates/demo.yaml)",
    )


def overrides(ns: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The parsed flags that are fields of the config dataclass ``cls``."""
    names = C.fields_of(cls)
    return {k: v for k, v in vars(ns).items() if k in names}


def show_settings(stage: str, cfg: Any, origins: dict[str, str], config: str | None) -> None:
    """Log the stage's effective settings and their origins; name the demo settings when a
    tiny model is run with the seed's (no config file)."""
    import logging

    log = logging.getLogger("hpc.launch")
    log.info(C.describe_settings(stage, cfg, origins))
    if config is None:
        for name in ("teacher", "student", "base_model"):
            model = getattr(cfg, name, None)
            if model and C.is_tiny_model(model):
                log.info(
                    f"{stage}: {model} is a tiny test model, run with the seed's settings; its "
                    f"demo settings are --config {C.DEMO_CONFIG.relative_to(C.REPO_ROOT)}"
                )


# --------------------------------------------------------------------------- commands


def cmd_data(cfg: C.DataConfig, ns: argparse.Namespace) -> int:
    """Write the deterministic question set."""
    from cot.dataset import write_splits

    train, test = write_splits(Path(cfg.out_dir), seed=cfg.seed)
    print(f"wrote {train} and {test}")
    return 0


def cmd_tiny_models(cfg: C.TinyModelsConfig, ns: argparse.Namespace) -> int:
    """Build the tiny teacher and student offline."""
    from hpc.prepare import build_tiny_models

    build_tiny_models(cfg)
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
    from hpc.stages import GenerateStage, run_stages

    run_stages([GenerateStage(cfg)], cfg, wait=cfg.wait)
    return 0


def cmd_evaluate(cfg: C.EvaluateConfig, ns: argparse.Namespace) -> int:
    """Sharded scoring of the student (and optionally the base student), then the report."""
    from hpc.stages import evaluation_stages, report_text, run_stages

    out = run_stages(evaluation_stages(cfg), cfg, wait=cfg.wait)
    if "report" in out.results:
        print(report_text(out.results["report"]))
    return 0


def cmd_train(cfg: C.TrainConfig, ns: argparse.Namespace) -> int:
    """Multi-node LoRA training (one job, nodes x tasks_per_node processes)."""
    from hpc.stages import TrainStage, run_stages

    run_stages([TrainStage(cfg)], cfg, wait=cfg.wait)
    return 0


def cmd_pipeline(ns: argparse.Namespace) -> int:
    """Every stage as one chain of dependent jobs (SLURM) or in the foreground (local)."""
    from hpc.pipeline import parse_sets, resolve, run_pipeline

    common = overrides(ns, C.ClusterFields)
    if hasattr(ns, "trust_remote_code"):  # applies to every stage that loads a model
        common["trust_remote_code"] = ns.trust_remote_code
    return run_pipeline(resolve(ns.config, parse_sets(ns.set or []), common))


def cmd_merge(ns: argparse.Namespace) -> int:
    """Merge a stage's shards by hand (normally a dependent job does it)."""
    from hpc.stages import MergeStage, describe

    if ns.keep not in (None, "all") and ns.stage != "generate":
        raise ConfigError(
            f"merge --stage {ns.stage} --keep {ns.keep}: filtering keeps teacher traces for "
            "training; a stage of scores is merged whole (--keep all)"
        )
    stage = MergeStage.from_run(Path(ns.run_dir), ns.stage, ns.output, ns.keep)
    print(describe(stage.run_here()))
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
        description="Submit every stage at once (SLURM, a chain of afterany jobs that check their "
        "inputs) or run them in order "
        "(local). Rerunning skips complete stages. Cluster flags apply to every stage; "
        "--set STAGE.KEY=VALUE overrides one stage, e.g. --set generate.shards=8.",
    )
    _config_flag(p)
    _add_dataclass_flags(p, C.ClusterFields)
    p.add_argument(
        "--trust-remote-code",
        "--trust_remote_code",
        dest="trust_remote_code",
        action=argparse.BooleanOptionalAction,
        default=argparse.SUPPRESS,
        help="allow model code shipped in the model folders, for every stage (a config file "
        "cannot turn it on alone)",
    )
    p.add_argument("--set", action="append", metavar="STAGE.KEY=VALUE", help="per-stage override")
    p = sub.add_parser("merge", help="merge a stage's completed shards (checks every record)")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--stage", default="generate", choices=SHARDED_STAGES)
    p.add_argument("--output", help="also copy the merged file here (atomically)")
    p.add_argument("--keep", choices=C.KEEPS, help="default: the launch's --keep")
    p = sub.add_parser("status", help="where a run stands: shards, records, requeues, jobs")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse, resolve the config, run the command. Errors exit non-zero with one clear line."""
    from cot.errors import CotError
    from hpc import logs

    parser = build_parser()
    ns = parser.parse_args(argv)
    logs.setup(verbose=ns.verbose)
    try:
        if ns.command == "merge":
            return cmd_merge(ns)
        if ns.command == "status":
            return cmd_status(ns)
        if ns.command == "pipeline":
            return cmd_pipeline(ns)
        section, cls, handler, _ = COMMANDS[ns.command]
        origins: dict[str, str] = {}
        cfg: Any = C.load_config(cls, section, ns.config, overrides(ns, cls), origins)
        if section in C.HYPERPARAMETERS:
            show_settings(section, cfg, origins, ns.config)
        return handler(cfg, ns)
    except CotError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
