"""Typed stage configs: dataclass defaults < YAML ``cluster:`` < YAML ``<stage>:`` < CLI flags.

Every stage has one dataclass. Cluster settings (partition, time, requeue policy...) are fields
of every stage that submits jobs, so a pipeline file can give each stage its own resources.
Unknown keys and bad values stop with an error naming the key and the file (and line).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = REPO_ROOT / "templates"
DEFAULT_CONFIG = TEMPLATES / "demo.yaml"

# Constraint tags used in field metadata.
POSITIVE = "positive"  # > 0
NONNEG = "nonneg"  # >= 0


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key and where it came from."""


def opt(
    default: Any,
    help: str,
    *,
    check: str | None = None,
    choices: tuple[str, ...] | None = None,
    aliases: tuple[str, ...] = (),
) -> Any:
    """A dataclass field with CLI help, a value check, choices and extra flag aliases."""
    meta = {"help": help, "check": check, "choices": choices, "aliases": aliases}
    return field(default=default, metadata=meta)


@dataclass
class ClusterFields:
    """Where and how a stage's jobs run. Shared by every stage that submits jobs."""

    cluster: str = opt(
        "auto",
        "auto picks SLURM only when a controller answers `scontrol ping`",
        choices=("auto", "slurm", "local"),
    )
    partition: str | None = opt(None, "SLURM partition")
    account: str | None = opt(None, "SLURM account")
    qos: str | None = opt(None, "SLURM quality of service")
    time_min: int = opt(240, "time limit per job, minutes", check=POSITIVE)
    gpus_per_task: int = opt(0, "GPUs per task (per node for training)", check=NONNEG)
    cpus_per_task: int = opt(2, "CPUs per task", check=POSITIVE)
    mem_gb: float | None = opt(None, "memory per node, GB", check=POSITIVE)
    array_parallelism: int | None = opt(None, "at most K array tasks at once (%K)", check=POSITIVE)
    signal_delay_s: int = opt(90, "seconds before the time limit that USR2 is sent", check=POSITIVE)
    max_num_timeout: int = opt(3, "requeues allowed after a timeout", check=NONNEG)
    local_parallelism: int = opt(2, "local executor: shards run at once", check=POSITIVE)
    run_dir: str = opt("runs/default", "run folder (plans, shards, markers, logs, outputs)")
    wait: bool = opt(False, "block until the stage (and its merge) finishes")


@dataclass
class DataConfig:
    """`data`: the deterministic synthetic question set."""

    out_dir: str = opt("data", "where raw_questions.jsonl and test_questions.jsonl go")
    seed: int = opt(0, "generator seed", check=NONNEG)


@dataclass
class TinyModelsConfig:
    """`tiny-models`: a tiny teacher and student built offline for tests and the demo."""

    out_dir: str = opt("models/tiny", "where teacher/ and student/ go")
    data_dir: str = opt("data", "dataset folder (built if missing)")
    seed: int = opt(0, "seed for tokenizer, init and training", check=NONNEG)
    teacher_steps: int = opt(300, "teacher training steps on reference solutions", check=NONNEG)
    student_steps: int = opt(300, "student pre-training steps (questions and steps)", check=NONNEG)
    force: bool = opt(False, "rebuild even if both models exist")


@dataclass
class DownloadConfig:
    """`download`: fetch real models once, on a login node (the only networked command)."""

    teacher: str | None = opt(None, "hub id of the teacher, e.g. Qwen/Qwen2.5-14B-Instruct")
    student: str | None = opt(None, "hub id of the student, e.g. Qwen/Qwen2.5-7B")
    out_dir: str = opt("models", "teacher/ and student/ are written below it")
    revision: str | None = opt(None, "branch, tag or commit")


@dataclass
class GenerateConfig(ClusterFields):
    """`generate`: sharded, batched, resumable teacher generation."""

    teacher: str = opt("models/tiny/teacher", "teacher model folder", aliases=("--teacher_dir",))
    input: str = opt("data/raw_questions.jsonl", "questions (JSONL with `question`)")
    output: str | None = opt(None, "merged dataset (default: RUN_DIR/generate/merged.jsonl)")
    shards: int = opt(1, "array tasks", check=POSITIVE)
    batch_size: int = opt(16, "sequences per generate call", check=POSITIVE)
    max_new_tokens: int = opt(512, "new-token cap per answer", check=POSITIVE)
    samples_per_question: int = opt(1, "traces per question", check=POSITIVE)
    temperature: float = opt(0.7, "0 means greedy", check=NONNEG)
    top_p: float = opt(1.0, "nucleus sampling", check=POSITIVE)
    keep: str = opt("all", "keep all traces or only correct ones", choices=("all", "correct"))
    start_index: int = opt(0, "first input record to use", check=NONNEG)
    num_samples: int | None = opt(None, "number of input records to use", check=POSITIVE)
    prompt_template: str = opt("templates/prompts/teacher.txt", "prompt with {question}")
    quant: str = opt(
        "auto", "auto: NF4 only where CUDA is present", choices=("auto", "nf4", "none")
    )
    trust_remote_code: bool = opt(False, "allow model code shipped in the model folder")
    seed: int = opt(0, "sampling seed", check=NONNEG)


@dataclass
class TrainConfig(ClusterFields):
    """`train`: multi-node LoRA with DeepSpeed ZeRO-2, resumable from complete checkpoints."""

    student: str = opt("models/tiny/student", "student model folder", aliases=("--student_dir",))
    data: str | None = opt(None, "training JSONL with question + cot (default: generate's merge)")
    out_dir: str | None = opt(None, "adapter and metrics (default: RUN_DIR/train)")
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
    quant: str = opt(
        "auto", "auto: NF4 only where CUDA is present", choices=("auto", "nf4", "none")
    )
    optim: str = opt(
        "auto",
        "auto: paged_adamw_8bit where CUDA is present, else adamw_torch",
        choices=("auto", "paged_adamw_8bit", "adamw_torch"),
    )
    deepspeed: str | None = opt("templates/ds_zero2.json", "DeepSpeed config ('' or null: DDP)")
    save_steps: int = opt(50, "checkpoint every S optimizer steps", check=POSITIVE)
    save_total_limit: int = opt(2, "keep the last K checkpoints", check=POSITIVE)
    logging_steps: int = opt(5, "log metrics every N steps", check=POSITIVE)
    gradient_checkpointing: bool = opt(False, "trade compute for memory")
    resume_from_checkpoint: str | None = opt(None, "a checkpoint folder (default: the latest)")
    trust_remote_code: bool = opt(False, "allow model code shipped in the model folder")
    seed: int = opt(42, "seed for LoRA init, data order and dropout", check=NONNEG)


@dataclass
class EvaluateConfig(ClusterFields):
    """`evaluate`: sharded scoring of the student (with or without the adapter)."""

    base_model: str = opt("models/tiny/student", "student base model folder")
    lora_model: str | None = opt(None, "LoRA adapter folder (none: score the base model)")
    input: str = opt("data/test_questions.jsonl", "test questions with `answer`")
    output: str | None = opt(None, "predictions (default: RUN_DIR/evaluate/merged.jsonl)")
    shards: int = opt(1, "array tasks", check=POSITIVE)
    batch_size: int = opt(16, "sequences per generate call", check=POSITIVE)
    max_new_tokens: int = opt(256, "new-token cap per answer", check=POSITIVE)
    compare_base: bool = opt(False, "also score the base student and show the difference")
    start_index: int = opt(0, "first input record to use", check=NONNEG)
    num_samples: int | None = opt(None, "number of input records to use", check=POSITIVE)
    quant: str = opt(
        "auto", "auto: NF4 only where CUDA is present", choices=("auto", "nf4", "none")
    )
    trust_remote_code: bool = opt(False, "allow model code shipped in the model folder")
    seed: int = opt(0, "seed", check=NONNEG)


STAGES: dict[str, type] = {
    "data": DataConfig,
    "tiny_models": TinyModelsConfig,
    "download": DownloadConfig,
    "generate": GenerateConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
}

C = TypeVar("C")


def fields_of(cls: type) -> dict[str, dataclasses.Field[Any]]:
    """The dataclass fields of ``cls`` by name."""
    return {f.name: f for f in dataclasses.fields(cls)}


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
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(
            f"{where}: '{name}' must be one of {list(meta['choices'])}, got {value!r}"
        )
    check = meta.get("check")
    if check == POSITIVE and value <= 0:
        raise ConfigError(f"{where}: '{name}' must be > 0, got {value!r}")
    if check == NONNEG and value < 0:
        raise ConfigError(f"{where}: '{name}' must be >= 0, got {value!r}")
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
    for key_node, val_node in root.value:
        section = key_node.value
        line = key_node.start_mark.line + 1
        if not isinstance(val_node, yaml.MappingNode):
            if val_node.tag.endswith(":null"):
                out[section] = ({}, {})
                continue
            raise ConfigError(f"{path}:{line}: section '{section}' must be a mapping")
        values: dict[str, Any] = {}
        lines: dict[str, int] = {}
        for k, v in val_node.value:
            values[k.value] = yaml.safe_load(yaml.serialize(v))
            lines[k.value] = k.start_mark.line + 1
        out[section] = (values, lines)
    return out


def load_config(
    cls: type[C],
    stage: str,
    config_file: str | Path | None,
    overrides: dict[str, Any] | None = None,
) -> C:
    """Resolve a stage config: defaults, then the file's ``cluster:`` and ``<stage>:``, then flags.

    Args:
        cls: the stage dataclass.
        stage: the section name in the YAML file (``generate``, ``train``...).
        config_file: a YAML file of sections, or None for dataclass defaults only.
        overrides: values from CLI flags (already typed by argparse), by field name.
    """
    values: dict[str, Any] = {}
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
        if stage in sections:
            sec_values, lines = sections[stage]
            for key, value in sec_values.items():
                where = f"{path}:{lines[key]}: {stage}.{key}"
                values[key] = coerce(cls, key, value, where)
    for key, value in (overrides or {}).items():
        values[key] = coerce(cls, key, value, f"command line: --{key.replace('_', '-')}")
    return cls(**values)


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
