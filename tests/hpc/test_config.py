"""Config resolution: defaults < YAML cluster: < YAML <stage>: < flags, with clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hpc import config as C
from hpc.launch import build_parser, main


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_precedence_defaults_cluster_stage_flags(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        "cluster:\n  partition: gpu\n  time_min: 30\ngenerate:\n  time_min: 90\n  batch_size: 8\n",
    )
    cfg = C.load_config(C.GenerateConfig, "generate", p, {"batch_size": 4})
    assert cfg.partition == "gpu"  # from cluster:
    assert cfg.time_min == 90  # generate: beats cluster:
    assert cfg.batch_size == 4  # the flag beats the file
    assert cfg.max_new_tokens == 512  # dataclass default


def test_unknown_key_names_key_file_and_line(tmp_path: Path) -> None:
    p = write(tmp_path, "generate:\n  batch_size: 8\n  bach_size: 4\n")
    with pytest.raises(C.ConfigError) as e:
        C.load_config(C.GenerateConfig, "generate", p)
    msg = str(e.value)
    assert f"{p}:3" in msg and "bach_size" in msg and "unknown key" in msg


def test_unknown_section(tmp_path: Path) -> None:
    p = write(tmp_path, "genrate:\n  batch_size: 8\n")
    with pytest.raises(C.ConfigError, match="unknown section 'genrate'"):
        C.load_config(C.GenerateConfig, "generate", p)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("train:\n  lr: -1.0e-4\n", "'lr' must be > 0"),
        ("generate:\n  shards: 0\n", "'shards' must be > 0"),
        ("generate:\n  batch_size: eight\n", "'batch_size' must be int"),
        ("generate:\n  keep: some\n", "'keep' must be one of"),
        ("cluster:\n  time_min: 1.5\n", "'time_min' must be int"),
        ("generate:\n  trust_remote_code: 1\n", "'trust_remote_code' must be bool"),
    ],
)
def test_bad_values(tmp_path: Path, text: str, needle: str) -> None:
    p = write(tmp_path, text)
    stage = text.split(":")[0]
    cls = {"train": C.TrainConfig, "generate": C.GenerateConfig, "cluster": C.GenerateConfig}[stage]
    with pytest.raises(C.ConfigError) as e:
        C.load_config(cls, "generate" if stage == "cluster" else stage, p)
    assert needle in str(e.value) and str(p) in str(e.value)


def test_yaml_float_written_as_1e_4_is_rejected_not_misread(tmp_path: Path) -> None:
    # PyYAML reads 1e-4 as a string; the error must say so rather than train with a string.
    p = write(tmp_path, "train:\n  lr: 1e-4\n")
    with pytest.raises(C.ConfigError, match="'lr' must be float"):
        C.load_config(C.TrainConfig, "train", p)


def test_seed_underscore_aliases_parse() -> None:
    parser = build_parser()
    ns = parser.parse_args(
        [
            "generate",
            "--teacher_dir",
            "T",
            "--max_new_tokens",
            "7",
            "--start_index",
            "3",
            "--num_samples",
            "5",
        ]
    )
    assert (ns.teacher, ns.max_new_tokens, ns.start_index, ns.num_samples) == ("T", 7, 3, 5)
    ns = parser.parse_args(
        [
            "train",
            "--student_dir",
            "S",
            "--per_device_train_batch_size",
            "3",
            "--lora_alpha",
            "32",
            "--out_dir",
            "O",
            "--max_length",
            "64",
            "--resume_from_checkpoint",
            "ck",
        ]
    )
    assert (ns.student, ns.per_device_train_batch_size, ns.lora_alpha) == ("S", 3, 32)
    assert (ns.out_dir, ns.max_length, ns.resume_from_checkpoint) == ("O", 64, "ck")


def test_cli_bad_config_exits_nonzero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = write(tmp_path, "data:\n  seeed: 1\n")
    assert main(["data", "--config", str(p), "--out-dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "seeed" in err and str(p) in err
    assert not (tmp_path / "d").exists()


def test_resolved_config_saved(tmp_path: Path) -> None:
    cfg = C.load_config(C.GenerateConfig, "generate", None, {"shards": 3})
    C.save_resolved(tmp_path, "generate", cfg)
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["generate"]["shards"] == 3 and saved["generate"]["batch_size"] == 16


def test_templates_load_cleanly() -> None:
    for path in sorted(C.TEMPLATES.rglob("*.yaml")):
        text = path.read_text()
        assert text.startswith("#"), f"{path} must start with a comment naming its command"
        if "accelerate" in path.name:
            continue
        for stage, cls in C.STAGES.items():
            flags = {"trust_remote_code": True} if "trust_remote_code: true" in text else {}
            C.load_config(
                cls, stage, path, flags if "trust_remote_code" in C.fields_of(cls) else {}
            )


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("train:\n  lr: .nan\n", "'lr' must be a finite number"),
        ("train:\n  epochs: .inf\n", "'epochs' must be a finite number"),
        ("generate:\n  temperature: .nan\n", "'temperature' must be a finite number"),
        ("generate:\n  top_p: .inf\n", "'top_p' must be a finite number"),
        ("cluster:\n  mem_gb: .inf\n", "'mem_gb' must be a finite number"),
        ("cluster:\n  mem_gb: 0.0001\n", "'mem_gb' must be >= 0.000976562"),
    ],
)
def test_nan_inf_and_tiny_memory_are_refused_with_file_and_line(
    tmp_path: Path, text: str, needle: str
) -> None:
    p = write(tmp_path, text)
    cls = C.TrainConfig if text.startswith("train") else C.GenerateConfig
    with pytest.raises(C.ConfigError) as e:
        C.load_config(cls, "train" if cls is C.TrainConfig else "generate", p)
    assert needle in str(e.value) and f"{p}:2" in str(e.value)


@pytest.mark.parametrize("field", ["partition", "account", "qos", "run_dir"])
@pytest.mark.parametrize("bad", ["debug\necho INJECTED #", "a\rb", "a\x00b"])
def test_values_that_reach_sbatch_refuse_newlines(field: str, bad: str) -> None:
    with pytest.raises(C.ConfigError, match="must not contain a newline"):
        C.load_config(C.GenerateConfig, "generate", None, {field: bad})


def test_newline_in_partition_exits_2_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    argv = ["generate", "--run-dir", str(run), "--partition", "debug\necho INJECTED #"]
    assert main(argv) == 2
    assert "must not contain a newline" in capsys.readouterr().err
    assert not run.exists()


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        ("generate:\n  shards: 2\n  shards: 4\n", 3, "generate.shards appears twice"),
        ("generate:\n  shards: 2\ntrain:\n  lr: 1.0e-4\ngenerate:\n  shards: 4\n", 5, "twice"),
    ],
)
def test_duplicate_keys_and_sections_are_refused(
    tmp_path: Path, text: str, line: int, needle: str
) -> None:
    p = write(tmp_path, text)
    with pytest.raises(C.ConfigError) as e:
        C.load_config(C.GenerateConfig, "generate", p)
    assert f"{p}:{line}" in str(e.value) and needle in str(e.value)


def test_path_fields_are_declared_once_and_resolved_in_one_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert set(C.path_fields(C.GenerateConfig)) == {
        "run_dir", "input", "output", "teacher", "prompt_template",
    }  # fmt: skip
    cfg = C.resolve_paths(C.GenerateConfig(input="q.jsonl", output=None))
    assert cfg.input == str(tmp_path / "q.jsonl") and cfg.output is None
    assert cfg.run_dir == str(tmp_path / "runs" / "default")
    assert cfg.prompt_template == str(C.REPO_ROOT / "templates" / "prompts" / "teacher.txt")
    # Shared fields are declared once: evaluate changes only their defaults.
    ev, gen = C.fields_of(C.EvaluateConfig), C.fields_of(C.GenerateConfig)
    assert dict(ev["input"].metadata) == dict(gen["input"].metadata)
    assert ev["max_new_tokens"].default == 256 and gen["max_new_tokens"].default == 512


@pytest.mark.parametrize("section", ["generate", "train", "evaluate"])
def test_trust_remote_code_in_a_file_needs_the_flag(tmp_path: Path, section: str) -> None:
    """A config file alone can never turn on code from a model folder: it takes the flag."""
    cls = C.STAGES[section]
    p = write(tmp_path, f"cluster:\n  partition: debug\n{section}:\n  trust_remote_code: true\n")
    with pytest.raises(C.ConfigError) as e:
        C.load_config(cls, section, p)
    msg = str(e.value)
    assert f"{p}:4: {section}.trust_remote_code" in msg and "--trust-remote-code" in msg
    assert C.load_config(cls, section, p, {"trust_remote_code": True}).trust_remote_code is True
    off = write(tmp_path, f"{section}:\n  trust_remote_code: false\n")
    assert C.load_config(cls, section, off).trust_remote_code is False


@pytest.mark.parametrize("command", ["generate", "pipeline"])
def test_trust_remote_code_from_a_file_exits_2_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    p = write(tmp_path, "generate:\n  shards: 2\n  trust_remote_code: yes\n")
    run = tmp_path / "run"
    assert main([command, "--config", str(p), "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{p}:3: generate.trust_remote_code" in err and "--trust-remote-code" in err
    assert not run.exists()


def test_origins_name_the_default_the_file_line_and_the_flag(tmp_path: Path) -> None:
    p = write(tmp_path, "cluster:\n  time_min: 30\ntrain:\n  lr: 0.01\n")
    origins: dict[str, str] = {}
    cfg = C.load_config(C.TrainConfig, "train", p, {"epochs": 1.0}, origins)
    assert (cfg.lr, cfg.epochs, cfg.max_length) == (0.01, 1.0, 1024)
    assert origins["lr"] == "cfg.yaml:4" and origins["time_min"] == "cfg.yaml:2"
    assert origins["epochs"] == "flag" and origins["max_length"] == "default"
    line = C.describe_settings("train", cfg, origins)
    assert "\n" not in line
    assert "lr=0.01 (cfg.yaml:4)" in line and "epochs=1.0 (flag)" in line


def _launch_without_config(args: list[str], tmp_path: Path) -> str:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != C.CONFIG_ENV}
    proc = subprocess.run(
        [sys.executable, "-m", "hpc.launch", *args, "--run-dir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    return proc.stdout + proc.stderr


def test_no_config_gives_the_seeds_hyperparameters_on_a_tiny_student(
    tmp_path: Path, tiny_models: Path
) -> None:
    # The seed's command on a tiny student: no demo settings sneak in (lr 0.01, batch 8...).
    err = _launch_without_config(
        ["train", "--student_dir", str(tiny_models / "student"), "--epochs", "3",
         "--cluster", "local"],
        tmp_path,
    )  # fmt: skip
    line = next(x for x in err.splitlines() if x.startswith("train: student="))
    for want in (
        "lr=0.0002 (default)",
        "epochs=3.0 (flag)",
        "per_device_train_batch_size=2 (default)",
        "gradient_accumulation_steps=4 (default)",
        "max_length=1024 (default)",
        "r=8 (default)",
        "lora_alpha=16 (default)",
        "lora_dropout=0.05 (default)",
        "precision=auto (default)",
        "optim=auto (default)",
    ):
        assert want in line, line
    assert "is a tiny test model" in err and "--config templates/demo.yaml" in err
    # Nothing was trained: the data it needs does not exist, and it says so.
    assert "merged.jsonl" in err


def test_no_config_generate_samples_at_the_seeds_temperature(tmp_path: Path) -> None:
    err = _launch_without_config(["generate", "--cluster", "local"], tmp_path)
    line = next(x for x in err.splitlines() if x.startswith("generate: teacher="))
    assert "teacher=models/teacher (default)" in line
    assert "shards=1 (default)" in line and "temperature=0.7 (default)" in line


def test_the_demo_config_gives_the_tiny_settings_and_names_its_lines() -> None:
    origins: dict[str, str] = {}
    cfg = C.load_config(C.TrainConfig, "train", C.DEMO_CONFIG, {}, origins)
    assert (cfg.lr, cfg.per_device_train_batch_size, cfg.max_length) == (0.01, 8, 256)
    assert origins["lr"].startswith("demo.yaml:")
    assert C.load_config(C.TrainConfig, "train", None).lr == 2.0e-4


def test_the_clis_precisions_are_the_loaders() -> None:
    from cot import models

    assert C.PRECISIONS == models.PRECISIONS
