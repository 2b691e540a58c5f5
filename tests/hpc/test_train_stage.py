"""The ``train`` stage's launcher side, in-process and torch-free: what is checked before anything
is submitted (data with file:line errors, the student folder, the DeepSpeed config, the
checkpoint to resume from), what the stage pins in ``train/fingerprint.json`` and the resolved
configs it writes (``RUN_DIR/config.yaml``, ``OUT_DIR/config.yaml``).

The student here is a fake folder with the files ``check_model_dir`` asks for; nothing loads it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from cot.errors import InputError
from cot.models import ModelError
from cot.records import RecordError
from hpc import config as C
from hpc import runs
from hpc.errors import ConfigError
from hpc.stages.train import TrainStage, validate_config

REPO = Path(__file__).resolve().parents[2]
DS = REPO / "templates" / "ds_zero2.json"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _student(folder: Path, **config: object) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", **config}))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"w")  # only its presence is checked
    return folder


def _data(path: Path, n: int = 3) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"id": str(i), "question": f"q{i}", "cot": f"c{i}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def student(tmp_path: Path) -> Path:
    return _student(tmp_path / "student")


def _cfg(tmp_path: Path, student: Path, **more: Any) -> C.TrainConfig:
    return C.TrainConfig(run_dir=str(tmp_path / "run"), student=str(student), **more)


def test_validate_config_counts_the_records_and_checks_every_input(
    tmp_path: Path, student: Path
) -> None:
    data = _data(tmp_path / "train.jsonl")
    cfg = _cfg(tmp_path, student, data=str(data), deepspeed=str(DS))
    assert validate_config(cfg) == 3  # the data is read by default
    assert validate_config(cfg, check_data=False) == 0
    # Data that a job of this command writes first is not read (it may not exist yet).
    missing = dataclasses.replace(cfg, data=str(tmp_path / "later.jsonl"))
    assert validate_config(missing, check_data=False) == 0

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "cot": "c"}\n{"question": "q2"}\n')
    with pytest.raises(RecordError, match=rf"^{re.escape(str(bad))}:2: field 'cot': missing"):
        validate_config(dataclasses.replace(cfg, data=str(bad)))

    ds = tmp_path / "ds.json"
    ds.write_text("{oops")
    with pytest.raises(InputError, match=rf"^{re.escape(str(ds))}:1: invalid JSON in DeepSpeed"):
        validate_config(dataclasses.replace(cfg, deepspeed=str(ds)))

    ckpt = tmp_path / "checkpoint-8"
    with pytest.raises(ConfigError) as err:
        validate_config(dataclasses.replace(cfg, resume_from_checkpoint=str(ckpt)))
    assert str(err.value) == f"--resume-from-checkpoint {ckpt}: no such folder"
    ckpt.mkdir()
    assert validate_config(dataclasses.replace(cfg, resume_from_checkpoint=str(ckpt))) == 3
    # A relaunch of a recorded start goes on from its own progress, even once rotation removed
    # the start; another run's record does not count.
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / ".resume_start.json").write_text(
        json.dumps({"path": str(ckpt.resolve()), "step": 8})
    )
    ckpt.rmdir()
    relaunch = dataclasses.replace(cfg, resume_from_checkpoint=str(ckpt), out_dir=str(out))
    assert validate_config(relaunch) == 3
    with pytest.raises(ConfigError, match="no such folder"):
        validate_config(dataclasses.replace(relaunch, out_dir=str(tmp_path / "other")))


def test_a_student_with_its_own_code_needs_trust_remote_code(tmp_path: Path) -> None:
    coded = _student(tmp_path / "coded", auto_map={"AutoModel": "m.M"})
    data = _data(tmp_path / "train.jsonl")
    cfg = _cfg(tmp_path, coded, data=str(data), deepspeed=None)
    with pytest.raises(ModelError, match="without --trust-remote-code") as err:
        validate_config(cfg)
    assert str(coded) in str(err.value)
    assert validate_config(dataclasses.replace(cfg, trust_remote_code=True)) == 3


def test_stage_validate_reads_the_data_unless_an_earlier_stage_writes_it(
    tmp_path: Path, student: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _data(tmp_path / "train.jsonl")
    TrainStage(_cfg(tmp_path, student, data=str(data))).validate(set())
    assert capsys.readouterr().out == f"train: 3 training records in {data}\n"

    # The data exists: it is checked even after an earlier stage of this command.
    data.write_text('{"question": "q"}\n')
    with pytest.raises(RecordError, match=rf"^{re.escape(str(data))}:1: field 'cot': missing"):
        TrainStage(_cfg(tmp_path, student, data=str(data))).validate({tmp_path / "x"})

    # Not there yet: the merge this command runs first will write it; nothing to read now.
    later = tmp_path / "run" / "generate" / "merged.jsonl"
    stage = TrainStage(_cfg(tmp_path, student))
    stage.validate({later})
    assert capsys.readouterr().out == ""
    # Not there and no stage writes it: refused, naming the file.
    with pytest.raises(RecordError) as err:
        stage.validate(set())
    assert str(err.value) == f"{later}: file not found"


def test_fingerprint_pins_student_data_deepspeed_out_dir_and_hyperparameters(
    tmp_path: Path, student: Path
) -> None:
    run = tmp_path / "run"
    outside = _data(tmp_path / "train.jsonl")
    hyper = {
        "epochs": 3.0, "max_steps": None, "lr": 0.0002, "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 4, "r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
        "max_length": 1024, "overlong": "truncate", "optim": "auto", "quant": "auto", "seed": 42,
    }  # fmt: skip
    pinned_student = {
        "path": str(student.resolve()),
        "files": {
            "config.json": _sha(student / "config.json"),
            "tokenizer.json": _sha(student / "tokenizer.json"),
            "model.safetensors": hashlib.sha256(b"w").hexdigest(),
        },
    }

    def expect(data: dict[str, str]) -> dict[str, object]:
        return {
            "stage": "train",
            "student": pinned_student,
            "data": data,
            "deepspeed": _sha(DS),
            "out_dir": str(run / "train"),
            "hyperparameters": hyper,
        }

    # Data from outside the run folder: pinned by its hash, written to train/fingerprint.json.
    stage = TrainStage(_cfg(tmp_path, student, data=str(outside), deepspeed=str(DS)))
    runs.make_run_dir(run)
    stage.plan()
    pinned = json.loads((run / "train" / "fingerprint.json").read_text())
    assert pinned == expect({"path": str(outside), "sha256": _sha(outside)})

    # This run's own merge (not written yet, or written): pinned by the generate stage.
    merged = run / "generate" / "merged.jsonl"
    fp = TrainStage(_cfg(tmp_path, student, deepspeed=str(DS))).fingerprint()
    assert fp == expect({"path": str(merged), "from": "this run folder"})
    _data(merged)
    fp = TrainStage(_cfg(tmp_path, student, deepspeed=str(DS))).fingerprint()
    assert fp == expect({"path": str(merged), "from": "this run folder"})

    # Outside the run folder and missing (a job of this command writes it): its path only.
    gone = tmp_path / "elsewhere.jsonl"
    fp = TrainStage(_cfg(tmp_path, student, data=str(gone), deepspeed=str(DS))).fingerprint()
    assert fp == expect({"path": str(gone)})

    # An explicit precision is pinned; "auto" adds no key (folders from before the flag).
    fp = TrainStage(_cfg(tmp_path, student, data=str(outside), precision="bf16")).fingerprint()
    assert fp["hyperparameters"] == {**hyper, "precision": "bf16"}


def test_plan_writes_the_resolved_config_to_the_run_and_the_output_folder(
    tmp_path: Path, student: Path
) -> None:
    data = _data(tmp_path / "train.jsonl")
    stage = TrainStage(_cfg(tmp_path, student, data=str(data), lr=1e-3))
    run = runs.make_run_dir(tmp_path / "run")
    stage.plan()
    resolved = C.to_dict(stage.cfg)
    assert resolved["lr"] == 1e-3 and resolved["out_dir"] == str(run / "train")
    assert yaml.safe_load((run / "config.yaml").read_text()) == {"train": resolved}
    text = (run / "train" / "config.yaml").read_text()
    assert yaml.safe_load(text) == resolved
    # Settings in their declared order (as --help lists them), not alphabetically.
    fields = [f.name for f in dataclasses.fields(C.TrainConfig)]
    assert list(yaml.safe_load(text)) == fields
    assert fields != sorted(fields)
