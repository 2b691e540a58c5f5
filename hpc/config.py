"""Typed stage configs: dataclass defaults < YAML ``cluster:`` < YAML ``<stage>:`` < CLI flags.

Every stage has one dataclass. Cluster settings (partition, time, requeue policy...) are fields
of every stage that submits jobs, so a pipeline file can give each stage its own resources.
Unknown keys and bad values stop with an error naming the key and the file (and line).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from hpc.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = REPO_ROOT / "templates"
# The tiny-model settings of the demo and the tests. Never applied unless asked for: with no
# --config (and no $COT_HPC_CONFIG) every stage gets the dataclass defaults, the seed's values.
DEMO_CONFIG = TEMPLATES / "demo.yaml"
CONFIG_ENV = "COT_HPC_CONFIG"


def default_config() -> str | None:
    """The config file used when ``--config`` is not given: ``$COT_HPC_CONFIG``, else none."""
    import os

    return os.environ.get(CONFIG_ENV) or None


# Constraint tags used in field metadata.
POSITIVE = "positive"  # > 0
NONNEG = "nonneg"  # >= 0
# Path kinds used in field metadata: resolved against the current folder, or, for files the repo
# ships (templates/...), against the repo when the current folder has no such file.
PATH = "path"
REPO_PATH = "repo_path"
# Characters that must never reach an sbatch script: sbatch stops reading #SBATCH lines at the
# first line that is not one, so a newline in a value would drop the settings after it.
SBATCH_UNSAFE = ("\n", "\r", "\x00")


def fields_of(cls: type) -> dict[str, dataclasses.Field[Any]]:
    """The dataclass fields of ``cls`` by name."""
    return {f.name: f for f in dataclasses.fields(cls)}


def opt(
    default: Any,
    help: str,
    *,
    check: str | None = None,
    choices: tuple[str, ...] | None = None,
    aliases: tuple[str, ...] = (),
    path: str | None = None,
    sbatch: bool = False,
    minimum: float | None = None,
) -> Any:
    """A dataclass field with CLI help, a value check, choices, flag aliases and a path kind.

    Args:
        path: ``PATH`` or ``REPO_PATH`` when the value is a file or folder; :func:`resolve_paths`
            makes every such field absolute before a job gets the config.
        sbatch: the value reaches the sbatch script; newlines, CR and NUL are refused.
        minimum: the smallest value allowed.
    """
    meta = {
        "help": help,
        "check": check,
        "choices": choices,
        "aliases": aliases,
        "path": path,
        "sbatch": sbatch,
        "minimum": minimum,
    }
    return field(default=default, metadata=meta)


def like(group: type, name: str, default: Any) -> Any:
    """Field ``name`` of ``group`` (its help, checks and path kind) with another default.

    Stages that share a field declare it once, in a group, and change only the default here.
    """
    f = fields_of(group)[name]
    return field(default=default, metadata=f.metadata)


@dataclass
class ClusterFields:
    """Where and how a stage's jobs run. Shared by every stage that submits jobs."""

    cluster: str = opt(
        "auto",
        "auto picks SLURM only when a controller answers `scontrol ping`",
        choices=("auto", "slurm", "local"),
    )
    partition: str | None = opt(None, "SLURM partition", sbatch=True)
    account: str | None = opt(None, "SLURM account", sbatch=True)
    qos: str | None = opt(None, "SLURM quality of service", sbatch=True)
    time_min: int = opt(240, "time limit per job, minutes", check=POSITIVE)
    gpus_per_task: int = opt(0, "GPUs per task (per node for training)", check=NONNEG)
    cpus_per_task: int = opt(2, "CPUs per task", check=POSITIVE)
    # Slurm reads --mem=0 as "all of the node's memory": a value that rounds to 0 MB is refused.
    mem_gb: float | None = opt(None, "memory per node, GB", check=POSITIVE, minimum=1 / 1024)
    array_parallelism: int | None = opt(None, "at most K array tasks at once (%K)", check=POSITIVE)
    signal_delay_s: int = opt(90, "seconds before the time limit that USR2 is sent", check=POSITIVE)
    max_num_timeout: int = opt(3, "requeues allowed after a timeout", check=NONNEG)
    local_parallelism: int = opt(2, "local executor: shards run at once", check=POSITIVE)
    run_dir: str = opt(
        "runs/default", "run folder (plans, shards, markers, logs, outputs)", path=PATH, sbatch=True
    )
    wait: bool = opt(False, "block until the stage (and its merge) finishes")


# The same four as cot.models.PRECISIONS, spelled here so that the CLI starts without
# importing the loader module (tests/hpc/test_config.py checks that they agree).
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@dataclass
class ModelFields:
    """How a model folder is loaded: shared by every stage that loads one."""

    quant: str = opt(
        "auto", "auto: NF4 only where CUDA is present", choices=("auto", "nf4", "none")
    )
    trust_remote_code: bool = opt(False, "allow model code shipped in the model folder")
    precision: str = opt(
        "auto",
        "weights and mixed precision: auto is bf16 where the GPU has it, else fp16 on CUDA and "
        "fp32 on CPU",
        choices=PRECISIONS,
    )


SERVER_PRESETS = ("vllm", "sglang", "transformers")
KEEPS = ("all", "correct", "majority")
PROMPT_TEMPLATE = "templates/prompts/teacher.txt"


@dataclass
class EngineFields:
    """How a sharded stage produces completions: in-process, or through an inference server."""

    engine: str = opt(
        "hf",
        "hf: in-process batched generate; server: an OpenAI-compatible server",
        choices=("hf", "server"),
    )
    server: str = opt(
        "transformers",
        "with --engine server: the preset each task starts (unless --server-command/--server-url)",
        choices=SERVER_PRESETS,
    )
    server_command: str | None = opt(
        None, "with --engine server: a command template with {model} {port} (and {gpus})"
    )
    server_url: str | None = opt(
        None, "with --engine server: use this running server; no server is started"
    )
    concurrency: int = opt(32, "with --engine server: requests in flight per task", check=POSITIVE)
    server_timeout_s: float = opt(
        900.0,
        "with --engine server: seconds a started server has to become healthy",
        check=POSITIVE,
    )
    prompt_format: str = opt(
        "auto", "auto: chat when the tokenizer has a chat template", choices=("auto", "raw", "chat")
    )


@dataclass
class ShardedFields(ClusterFields, ModelFields, EngineFields):
    """A stage that runs a model over an input file as an array of shards (generate, evaluate)."""

    input: str = opt(
        "data/raw_questions.jsonl",
        "questions with a `question` field: a JSONL or Parquet file, or a folder of them",
        path=PATH,
    )
    output: str | None = opt(
        None, "merged output (default: RUN_DIR/<stage>/merged.jsonl)", path=PATH
    )
    shards: int = opt(1, "array tasks", check=POSITIVE)
    batch_size: int = opt(16, "sequences per generate call", check=POSITIVE)
    max_new_tokens: int = opt(512, "new-token cap per answer", check=POSITIVE)
    start_index: int = opt(0, "first input record to use", check=NONNEG)
    num_samples: int | None = opt(None, "number of input records to use", check=POSITIVE)
    seed: int = opt(0, "sampling seed", check=NONNEG)
    samples_per_question: int = opt(
        1, "completions per question (more than 1 needs --temperature > 0)", check=POSITIVE
    )
    temperature: float = opt(0.0, "0 means greedy", check=NONNEG)
    top_p: float = opt(1.0, "nucleus sampling", check=POSITIVE)


@dataclass
class DataConfig:
    """`data`: the deterministic synthetic question set."""

    out_dir: str = opt("data", "where raw_questions.jsonl and test_questions.jsonl go", path=PATH)
    seed: int = opt(0, "generator seed", check=NONNEG)


@dataclass
class TinyModelsConfig:
    """`tiny-models`: a tiny teacher and student built offline for tests and the demo."""

    out_dir: str = opt("models/tiny", "where teacher/ and student/ go", path=PATH)
    data_dir: str = opt("data", "dataset folder (built if missing)", path=PATH)
    seed: int = opt(0, "seed for tokenizer, init and training", check=NONNEG)
    teacher_steps: int = opt(300, "teacher training steps on reference solutions", check=NONNEG)
    student_steps: int = opt(300, "student pre-training steps (questions and steps)", check=NONNEG)
    force: bool = opt(False, "rebuild even if both models exist")


@dataclass
class DownloadConfig:
    """`download`: fetch real models once, on a login node (the only networked command)."""

    teacher: str | None = opt(None, "hub id of the teacher, e.g. Qwen/Qwen2.5-14B-Instruct")
    student: str | None = opt(None, "hub id of the student, e.g. Qwen/Qwen2.5-7B")
    out_dir: str = opt("models", "teacher/ and student/ are written below it", path=PATH)
    revision: str | None = opt(None, "branch, tag or commit")


@dataclass
class GenerateConfig(ShardedFields):
    """`generate`: sharded, batched, resumable teacher generation."""

    teacher: str = opt(
        "models/teacher", "teacher model folder", aliases=("--teacher_dir",), path=PATH
    )
    temperature: float = like(ShardedFields, "temperature", 0.7)
    keep: str = opt(
        "all",
        "all traces; only correct ones (needs gold answers); or, with several samples, those "
        "whose answer is the question's majority answer (needs no gold)",
        choices=KEEPS,
    )
    prompt_template: str = opt(PROMPT_TEMPLATE, "prompt with {question}", path=REPO_PATH)


@dataclass
class TrainConfig(ClusterFields, ModelFields):
    """`train`: multi-node LoRA with DeepSpeed ZeRO-2, resumable from complete checkpoints."""

    student: str = opt(
        "models/student", "student model folder", aliases=("--student_dir",), path=PATH
    )
    data: str | None = opt(
        None, "training JSONL with question + cot (default: generate's merge)", path=PATH
    )
    out_dir: str | None = opt(None, "adapter and metrics (default: RUN_DIR/train)", path=PATH)
    nodes: int = opt(1, "nodes", check=POSITIVE)
    tasks_per_node: int | None = opt(None, "processes per node (default: one per GPU, else 1)")
    gpus_per_node: int | None = opt(None, "GPUs per node (default: gpus_per_task)", check=NONNEG)
    epochs: float = opt(3.0, "training epochs", check=POSITIVE, aliases=("--num_train_epochs",))
    max_steps: int | None = opt(None, "stop after this many optimizer steps", check=POSITIVE)
    lr: float = opt(2.0e-4, "learning rate", check=POSITIVE, aliases=("--learning_rate",))
    per_device_train_batch_size: int = opt(2, "micro-batch per process", check=POSITIVE)
    gradient_accumulation_steps: int = opt(4, "micro-batches per optimizer step", check=POSITIVE)
    r: int = opt(8, "LoRA rank", check=POSITIVE, aliases=("--lora_r",))
    lora_alpha: int = opt(16, "LoRA alpha", check=POSITIVE)
    lora_dropout: float = opt(0.05, "LoRA dropout", check=NONNEG)
    max_length: int = opt(1024, "tokens per example", check=POSITIVE)
    overlong: str = opt("truncate", "records over max_length", choices=("truncate", "drop"))
    optim: str = opt(
        "auto",
        "auto: paged_adamw_8bit where CUDA is present, else adamw_torch",
        choices=("auto", "paged_adamw_8bit", "adamw_torch"),
    )
    deepspeed: str | None = opt(
        "templates/ds_zero2.json", "DeepSpeed config ('' or null: DDP)", path=REPO_PATH
    )
    save_steps: int = opt(50, "checkpoint every S optimizer steps", check=POSITIVE)
    save_total_limit: int = opt(2, "keep the last K checkpoints", check=POSITIVE)
    logging_steps: int = opt(5, "log metrics every N steps", check=POSITIVE)
    gradient_checkpointing: bool = opt(False, "trade compute for memory")
    report_to: str = opt(
        "none",
        "training metrics: tensorboard writes under the run folder; wandb runs offline only",
        choices=("none", "tensorboard", "wandb"),
    )
    resume_from_checkpoint: str | None = opt(
        None, "a checkpoint folder (default: the latest)", path=PATH
    )
    seed: int = opt(42, "seed for LoRA init, data order and dropout", check=NONNEG)


@dataclass
class EvaluateConfig(ShardedFields):
    """`evaluate`: sharded scoring of the student (with or without the adapter)."""

    base_model: str = opt("models/student", "student base model folder", path=PATH)
    lora_model: str | None = opt(
        None, "LoRA adapter folder (none: score the base model, once)", path=PATH
    )
    teacher: str | None = opt(
        None,
        "also score this teacher model folder on the test questions, and the student's "
        "agreement with it",
        aliases=("--teacher_dir",),
        path=PATH,
    )
    teacher_prompt_template: str = like(GenerateConfig, "prompt_template", PROMPT_TEMPLATE)
    score_teacher: bool = opt(
        True,
        "pipeline: also score generate's teacher on these questions, with generate's engine, "
        "prompt and resources (unless `teacher` names another)",
    )
    input: str = like(ShardedFields, "input", "data/test_questions.jsonl")
    # The student is trained on the raw ``### Question:`` format, so that is what it is asked in.
    prompt_format: str = like(EngineFields, "prompt_format", "raw")
    max_new_tokens: int = like(ShardedFields, "max_new_tokens", 256)
    compare_base: bool = opt(
        False, "with --lora-model: also score the base student and show the difference"
    )


STAGES: dict[str, type] = {
    "data": DataConfig,
    "tiny_models": TinyModelsConfig,
    "download": DownloadConfig,
    "generate": GenerateConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
}

C = TypeVar("C")


def _type_of(cls: type, name: str) -> tuple[type, bool]:
    """(base type, optional) of a field, from its annotation."""
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        (base,) = [a for a in args if a is not type(None)]
        return base, True
    return hint, False


def coerce(cls: type, name: str, value: Any, where: str) -> Any:
    """Check and convert one value for field ``name`` of ``cls``; raise ConfigError naming it."""
    flds = fields_of(cls)
    if name not in flds:
        known = ", ".join(sorted(flds))
        raise ConfigError(f"{where}: unknown key '{name}' (known keys: {known})")
    base, optional = _type_of(cls, name)
    meta = flds[name].metadata
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: '{name}' must not be empty")
    ok = (
        (base is bool and isinstance(value, bool))
        or (base is int and isinstance(value, int) and not isinstance(value, bool))
        or (base is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (base is str and isinstance(value, (str, int, float)) and not isinstance(value, bool))
    )
    if not ok:
        raise ConfigError(
            f"{where}: '{name}' must be {base.__name__}, got {type(value).__name__} {value!r}"
        )
    value = base(value)
    if base is float and not math.isfinite(value):
        raise ConfigError(f"{where}: '{name}' must be a finite number, got {value!r}")
    if meta.get("sbatch") and any(c in value for c in SBATCH_UNSAFE):
        raise ConfigError(
            f"{where}: '{name}' must not contain a newline, carriage return or NUL "
            f"(it reaches the sbatch script), got {value!r}"
        )
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(
            f"{where}: '{name}' must be one of {list(meta['choices'])}, got {value!r}"
        )
    check = meta.get("check")
    if check == POSITIVE and value <= 0:
        raise ConfigError(f"{where}: '{name}' must be > 0, got {value!r}")
    if check == NONNEG and value < 0:
        raise ConfigError(f"{where}: '{name}' must be >= 0, got {value!r}")
    low = meta.get("minimum")
    if low is not None and value < low:
        why = " (--mem=0 means all of a node's memory to Slurm)" if name == "mem_gb" else ""
        raise ConfigError(f"{where}: '{name}' must be >= {low:.6g}, got {value!r}{why}")
    return value


def _yaml_sections(path: Path) -> dict[str, tuple[dict[str, Any], dict[str, int]]]:
    """Parse a config file into {section: (values, {key: line})}; lines are 1-based."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 ({e})") from None
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if root is None:
        return {}
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"{path}:1: the config must be a mapping of sections")
    out: dict[str, tuple[dict[str, Any], dict[str, int]]] = {}
    section_lines: dict[str, int] = {}
    for key_node, val_node in root.value:
        section = key_node.value
        line = key_node.start_mark.line + 1
        if section in section_lines:
            raise ConfigError(
                f"{path}:{line}: section '{section}' appears twice (first on line "
                f"{section_lines[section]})"
            )
        section_lines[section] = line
        if not isinstance(val_node, yaml.MappingNode):
            if val_node.tag.endswith(":null"):
                out[section] = ({}, {})
                continue
            raise ConfigError(f"{path}:{line}: section '{section}' must be a mapping")
        values: dict[str, Any] = {}
        lines: dict[str, int] = {}
        for k, v in val_node.value:
            if k.value in lines:
                raise ConfigError(
                    f"{path}:{k.start_mark.line + 1}: {section}.{k.value} appears twice "
                    f"(first on line {lines[k.value]})"
                )
            values[k.value] = yaml.safe_load(yaml.serialize(v))
            lines[k.value] = k.start_mark.line + 1
        out[section] = (values, lines)
    return out


def load_config(
    cls: type[C],
    stage: str,
    config_file: str | Path | None,
    overrides: dict[str, Any] | None = None,
    origins: dict[str, str] | None = None,
) -> C:
    """Resolve a stage config: defaults, then the file's ``cluster:`` and ``<stage>:``, then flags.

    Args:
        cls: the stage dataclass.
        stage: the section name in the YAML file (``generate``, ``train``...).
        config_file: a YAML file of sections, or None for dataclass defaults only.
        overrides: values from CLI flags (already typed by argparse), by field name.
        origins: filled with where each field's value came from: ``default``, ``FILE:LINE``
            or ``flag``.
    """
    values: dict[str, Any] = {}
    where_from: dict[str, str] = {}
    if config_file is not None:
        path = Path(config_file)
        sections = _yaml_sections(path)
        for name in sections:
            if name not in STAGES and name != "cluster":
                known = ", ".join(sorted([*STAGES, "cluster"]))
                raise ConfigError(f"{path}: unknown section '{name}' (known sections: {known})")
        if issubclass(cls, ClusterFields) and "cluster" in sections:
            sec_values, lines = sections["cluster"]
            for key, value in sec_values.items():
                where = f"{path}:{lines[key]}: cluster.{key}"
                values[key] = coerce(ClusterFields, key, value, where)
                where_from[key] = f"{path.name}:{lines[key]}"
        if stage in sections:
            sec_values, lines = sections[stage]
            for key, value in sec_values.items():
                where = f"{path}:{lines[key]}: {stage}.{key}"
                values[key] = coerce(cls, key, value, where)
                where_from[key] = f"{path.name}:{lines[key]}"
                # A file (shared, copied from a run folder, edited by someone else) never runs
                # a model folder's code on its own: that takes the flag, each time.
                flagged = (overrides or {}).get("trust_remote_code") is True
                if key == "trust_remote_code" and values[key] is True and not flagged:
                    raise ConfigError(
                        f"{where}: true runs Python code shipped in the model folder; a "
                        "config file cannot turn it on alone, give --trust-remote-code too"
                    )
    for key, value in (overrides or {}).items():
        values[key] = coerce(cls, key, value, f"command line: --{key.replace('_', '-')}")
        where_from[key] = "flag"
    if origins is not None:
        origins.update({name: where_from.get(name, "default") for name in fields_of(cls)})
    return cls(**values)


def is_tiny_model(model: str | Path) -> bool:
    """True for a model folder that ``tiny-models`` built (its ``build.json`` says so)."""
    import json

    stamp = Path(model).parent / "build.json"
    try:
        recipe = json.loads(stamp.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(recipe, dict) and "builder" in recipe and Path(model).name in recipe


# What the launch shows of each stage's settings, in this order.
HYPERPARAMETERS: dict[str, tuple[str, ...]] = {
    "generate": (
        "teacher", "shards", "samples_per_question", "temperature", "top_p", "max_new_tokens",
        "seed", "keep", "engine", "precision", "quant",
    ),
    "train": (
        "student", "lr", "epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
        "max_length", "r", "lora_alpha", "lora_dropout", "precision", "optim", "quant",
        "deepspeed", "nodes", "seed",
    ),
    "evaluate": (
        "base_model", "lora_model", "teacher", "shards", "samples_per_question", "temperature",
        "max_new_tokens", "engine", "precision", "quant",
    ),
}  # fmt: skip


def describe_settings(stage: str, cfg: Any, origins: dict[str, str]) -> str:
    """One line: each setting the stage's results depend on, with where its value came from."""
    parts = []
    for name in HYPERPARAMETERS.get(stage, ()):
        value = getattr(cfg, name)
        if name == "deepspeed" and value:
            value = Path(value).name
        parts.append(f"{name}={value} ({origins.get(name, 'default')})")
    return f"{stage}: " + ", ".join(parts)


def resolve_paths(cfg: C) -> C:
    """A copy of ``cfg`` with every path field absolute (jobs start in another folder).

    This is the one place that decides what a path is: the ``path`` kind in each field's
    metadata. A relative ``REPO_PATH`` (a file the repo ships, such as ``templates/...``) that
    does not exist under the current folder is taken from the repo, so the shipped defaults
    work from anywhere.
    """
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):  # type: ignore[arg-type]
        kind, value = f.metadata.get("path"), getattr(cfg, f.name)
        if not kind or not value:
            continue
        p = Path(value)
        repo_file = kind == REPO_PATH and not p.is_absolute() and not p.exists()
        if repo_file and (REPO_ROOT / p).exists():
            p = REPO_ROOT / p
        changes[f.name] = str(p.resolve())
    return dataclasses.replace(cfg, **changes)  # type: ignore[type-var]


def path_fields(cls: type) -> list[str]:
    """The names of the fields of ``cls`` that hold a path."""
    return [n for n, f in fields_of(cls).items() if f.metadata.get("path")]


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict of a stage config, for YAML dumps and job payloads."""
    return dataclasses.asdict(cfg)


def save_resolved(run_dir: Path, stage: str, cfg: Any) -> Path:
    """Merge ``cfg`` into RUN_DIR/config.yaml under ``stage`` (atomically)."""
    from cot.records import atomic_write_text

    path = run_dir / "config.yaml"
    current: dict[str, Any] = {}
    if path.exists():
        current = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    current[stage] = to_dict(cfg)
    atomic_write_text(path, yaml.safe_dump(current, sort_keys=False))
    return path
