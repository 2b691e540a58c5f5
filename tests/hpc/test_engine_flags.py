"""Engine flags that cannot work are refused in one line, exit 2, before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpc.launch import main

CASES = [
    (["--server-url", "http://127.0.0.1:9"], "--server-url needs --engine server"),
    (["--server-command", "vllm serve {model} --port {port}"], "--server-command needs --engine"),
    (
        [
            "--engine",
            "server",
            "--server-url",
            "http://h:1",
            "--server-command",
            "x {model} {port}",
        ],
        "exclude each other",
    ),
    (["--engine", "server", "--server-url", "localhost:8000"], "must start with http://"),
    (["--engine", "server", "--server-command", "serve {model}"], "missing the {port}"),
    (["--engine", "server", "--server-command", "serve {model} {port} {gpu}"], "{gpu}"),
    (["--engine", "server", "--server-command", "serve {model} {port} {lora}"], "no LoRA adapter"),
    (["--engine", "server", "--concurrency", "0"], "concurrency"),
]


@pytest.mark.parametrize(("flags", "needle"), CASES)
def test_generate_refuses_bad_engine_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], needle: str
) -> None:
    run = tmp_path / "run"
    assert main(["generate", "--run-dir", str(run), *flags]) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (run / "generate").exists()


def test_evaluate_refuses_an_adapter_the_transformers_preset_cannot_serve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    (tmp_path / "lora").mkdir()
    argv = ["evaluate", "--run-dir", str(run), "--engine", "server", "--server", "transformers"]
    assert main([*argv, "--lora-model", str(tmp_path / "lora")]) == 2
    assert "cannot serve a LoRA adapter" in capsys.readouterr().err
    assert not (run / "evaluate").exists()
