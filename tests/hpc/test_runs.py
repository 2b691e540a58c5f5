"""The run folder and the training output folder: what a launch may adopt, and their modes."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from hpc import config as C
from hpc import runs
from hpc.errors import ConfigError
from hpc.launch import main


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _home_like(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("# mine\n")
    (home / "notes.txt").write_text("notes\n")
    home.chmod(0o755)
    return home


def test_a_non_empty_folder_that_is_no_run_folder_is_refused_and_left_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = _home_like(tmp_path)
    assert main(["generate", "--run-dir", str(home)]) == 2
    err = capsys.readouterr().err
    assert f"--run-dir {home}: the folder is not empty and is not a cot-hpc run folder" in err
    assert _mode(home) == 0o755  # not chmod'ed
    assert sorted(p.name for p in home.iterdir()) == [".bashrc", "notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        runs.make_run_dir(tmp_path / "file")


def test_new_empty_and_earlier_run_folders_are_taken_user_only(tmp_path: Path) -> None:
    new = runs.make_run_dir(tmp_path / "a" / "run")
    assert _mode(new) == 0o700 and (new / ".cot-hpc-run").exists()
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o755)
    assert _mode(runs.make_run_dir(empty)) == 0o700
    # A run folder of a launch from before the marker existed: it has launch.json.
    older = tmp_path / "older"
    older.mkdir()
    (older / "launch.json").write_text(json.dumps({"stages": {}}))
    (older / "generate").mkdir()
    assert runs.make_run_dir(older) == older.resolve()
    assert runs.make_run_dir(new) == new  # a relaunch


def test_out_dir_outside_the_run_folder_is_user_only_and_never_adopts_a_foreign_one(
    tmp_path: Path, tiny_models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from hpc.stages import TrainStage

    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"id": "1", "question": "q", "cot": "c"}) + "\n")
    out = tmp_path / "elsewhere" / "adapter-out"
    cfg = C.TrainConfig(
        run_dir=str(tmp_path / "run"),
        out_dir=str(out),
        data=str(data),
        student=str(tiny_models / "student"),
    )
    stage = TrainStage(cfg)
    runs.make_run_dir(cfg.run_dir)
    stage.plan()
    assert _mode(out) == 0o700 and (out / "config.yaml").exists()
    stage.plan()  # a relaunch reopens its own output folder
    home = _home_like(tmp_path)
    with pytest.raises(ConfigError, match="is not a training output folder"):
        runs.make_out_dir(home)
    argv = ["train", "--run-dir", str(tmp_path / "run2"), "--out-dir", str(home)]
    assert main([*argv, "--data", str(data), "--student", str(tiny_models / "student")]) == 2
    assert "--out-dir" in capsys.readouterr().err
    assert _mode(home) == 0o755 and not (tmp_path / "run2").exists()
