"""``train`` end to end: input checks (no cluster), a local DDP run, and the real test Slurm.

Every run goes through the CLI (``python -m hpc.launch train ...``) in a subprocess, exactly as a
user types it, with an empty ``--config`` so that only the flags below and the dataclass defaults
apply. The SLURM runs use both fake nodes (``--nodes 2 --tasks-per-node 1``, gloo on CPU) and
DeepSpeed ZeRO-2, on 96 synthetic records, 40 optimizer steps of 8 sequences.

``reference`` (an uninterrupted run) is a module fixture; the preempted run and the run resumed
over a torn checkpoint must end with an adapter equal to it. ``timeout_min`` is 60: submitit
counts a USR2 in the first 80% of the limit as a preemption, not a timeout (SLURM.md).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from hpc import runs
from tests.slurm_helpers import wait_for

REPO = Path(__file__).resolve().parents[2]
STUDENT = REPO / "models" / "tiny" / "student"
STEPS = 40
SAVE = 8
DEADLINE_S = 300.0


# --------------------------------------------------------------------------- helpers


def _records(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Addition word problems with 1-4 step solutions, so lengths vary (grouping matters)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        terms = [rng.randint(1, 99) for _ in range(rng.randint(2, 5))]
        lines, total = [], terms[0]
        for t in terms[1:]:
            lines.append(f"Add {t}: {total} + {t} = {total + t}.")
            total += t
        question = "What is " + " + ".join(map(str, terms)) + "?"
        out.append({"question": question, "cot": "\n".join([*lines, f"Final Answer: {total}"])})
    return out


@pytest.fixture(scope="module")
def inputs(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records(96)), encoding="utf-8")
    empty = root / "empty.yaml"
    empty.write_text("# no sections: dataclass defaults + flags\n", encoding="utf-8")
    return {"root": root, "data": data, "config": empty}


def _argv(inputs: dict[str, Path], run_dir: Path, *extra: str, cluster: str = "slurm") -> list[str]:
    argv = [
        sys.executable, "-m", "hpc.launch", "train",
        "--config", str(inputs["config"]),
        "--cluster", cluster,
        "--student", str(STUDENT),
        "--data", str(inputs["data"]),
        "--run-dir", str(run_dir),
        "--max-steps", str(STEPS),
        "--save-steps", str(SAVE),
        "--save-total-limit", "2",
        "--logging-steps", "1",
        "--per-device-train-batch-size", "4",
        "--gradient-accumulation-steps", "1",
        "--max-length", "96",
        "--lr", "2.0e-3",
        "--seed", "5",
        "--quant", "none",
        "--optim", "adamw_torch",
        "--cpus-per-task", "1",
        "--time-min", "60",
        "--signal-delay-s", "30",
    ]  # fmt: skip
    if cluster == "slurm":
        argv += ["--nodes", "2", "--tasks-per-node", "1", "--wait"]
    return argv + list(extra)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO), COT_HPC_POLL_S="2", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    return env


def _run(argv: list[str], timeout: float = DEADLINE_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout, check=False
    )


def _start(argv: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        argv, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(proc: subprocess.Popen[str], job: str | None) -> str:
    try:
        out, _ = proc.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        if job:
            subprocess.run(["scancel", job], check=False)
        pytest.fail(f"training did not finish within {DEADLINE_S:.0f}s")
    assert proc.returncode == 0, out
    return out


def _job_id(run_dir: Path, timeout: float = 120.0) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            data = json.loads((run_dir / "launch.json").read_text())
            return str(data["stages"]["train"]["submissions"][-1]["job"])
        except (OSError, ValueError, KeyError):
            time.sleep(0.2)
    pytest.fail(f"no job recorded in {run_dir / 'launch.json'}")


def _steps_logged(run_dir: Path) -> int:
    path = run_dir / "train" / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def _log(run_dir: Path, job: str, task: int = 0) -> str:
    return (run_dir / "logs" / f"{job}_{task}_log.out").read_text(errors="replace")


def _adapter_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x = load_file(str(a / "train" / "adapter" / "adapter_model.safetensors"))
    y = load_file(str(b / "train" / "adapter" / "adapter_model.safetensors"))
    assert x.keys() == y.keys()
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def _resumed_from(log: str) -> int | None:
    m = re.search(r"resuming from .*checkpoint-(\d+)", log)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------- no cluster


def test_bad_records_fail_before_anything_is_submitted(
    inputs: dict[str, Path], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"question": "q", "cot": "c"})
    bad.write_text(f'{good}\n{{"question": "q", "cot": 7}}\n', encoding="utf-8")
    run_dir = tmp_path / "run"
    res = _run(_argv(inputs, run_dir, "--data", str(bad), cluster="local"), timeout=60)
    assert res.returncode == 2, res.stderr
    assert f"{bad}:2: field 'cot': must be a string, got int" in res.stderr
    assert not run_dir.exists()  # no run folder, no pickles, no job

    res = _run(_argv(inputs, run_dir, "--data", str(tmp_path / "nope.jsonl"), cluster="local"))
    assert res.returncode == 2 and "file not found" in res.stderr
    res = _run(_argv(inputs, run_dir, "--student", str(tmp_path / "nostudent"), cluster="local"))
    assert res.returncode == 2 and "does not exist" in res.stderr
    bad_ds = tmp_path / "ds.json"
    bad_ds.write_text("{oops")
    res = _run(_argv(inputs, run_dir, "--deepspeed", str(bad_ds), cluster="local"))
    assert res.returncode == 2 and f"{bad_ds}:1: invalid JSON" in res.stderr
    assert not run_dir.exists()


def test_job_shape_paths_and_failure_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hpc.backends import Resources, failure_line
    from hpc.config import ConfigError, TrainConfig
    from hpc.stages.train import job_shape, resolve

    def shape(cfg: TrainConfig) -> tuple[int, int]:
        res = job_shape(cfg)
        assert isinstance(res, Resources) and res.nodes == cfg.nodes
        return res.tasks_per_node, res.gpus_per_node

    assert shape(TrainConfig()) == (1, 0)  # CPU: one process per node
    assert shape(TrainConfig(gpus_per_node=4)) == (4, 4)  # one process per GPU
    assert shape(TrainConfig(gpus_per_task=2)) == (2, 2)
    assert shape(TrainConfig(tasks_per_node=3, nodes=2)) == (3, 0)
    with pytest.raises(ConfigError, match="one process per GPU"):
        job_shape(TrainConfig(gpus_per_node=2, tasks_per_node=4))
    monkeypatch.chdir(tmp_path)  # the template default is found from any folder
    cfg = resolve(TrainConfig(run_dir="r"))
    assert cfg.out_dir == str(tmp_path / "r" / "train")
    assert cfg.data == str(tmp_path / "r" / "generate" / "merged.jsonl")
    assert cfg.deepspeed == str(REPO / "templates" / "ds_zero2.json")
    text = (
        "Job (task=0) failed during processing with trace:\n----------------------\n"
        "Traceback (most recent call last):\n  File x\nValueError: bad checkpoint\n"
        "----------------------\nYou can check full logs at paths:\n  - /x/1_0_log.err\n"
    )
    assert failure_line(text) == "ValueError: bad checkpoint"
    assert failure_line("plain error") == "plain error"


def test_report_to_without_its_package_fails_before_anything_is_submitted(
    inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    from hpc.config import ConfigError, TrainConfig
    from hpc.stages.train import validate_config

    cfg = TrainConfig(student=str(STUDENT), data=str(inputs["data"]), deepspeed=None)
    for report_to in ("none", "tensorboard"):  # tensorboard is in the test install
        validate_config(replace(cfg, report_to=report_to))
    real = importlib.util.find_spec
    gone = {"tensorboard", "tensorboardX", "wandb"}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in gone else real(name, *a)
    )
    for report_to in ("tensorboard", "wandb"):
        with pytest.raises(ConfigError) as err:
            validate_config(replace(cfg, report_to=report_to))
        msg = str(err.value)
        assert "\n" not in msg and f"--report-to {report_to}" in msg
        assert f"pip install {report_to}" in msg
    monkeypatch.undo()
    if importlib.util.find_spec("wandb") is None:  # the whole launch, as a user types it
        run_dir = tmp_path / "run"
        res = _run(_argv(inputs, run_dir, "--report-to", "wandb", cluster="local"), timeout=60)
        assert res.returncode == 2, res.stdout + res.stderr
        assert "--report-to wandb needs the wandb package" in res.stderr
        assert not run_dir.exists()


def test_fingerprint_pins_precision(inputs: dict[str, Path], tmp_path: Path) -> None:
    from hpc.config import TrainConfig
    from hpc.errors import PlanError
    from hpc.stages.train import TrainStage

    def stage(precision: str) -> TrainStage:
        cfg = TrainConfig(
            student=str(STUDENT), data=str(inputs["data"]), run_dir=str(tmp_path / "run"),
            precision=precision,
        )  # fmt: skip
        return TrainStage(cfg)

    first = stage("fp16")
    assert first.fingerprint()["hyperparameters"]["precision"] == "fp16"
    first.pin()
    stage("fp16").pin()  # the same settings: accepted
    with pytest.raises(PlanError, match=r"hyperparameters\.precision: fp16 -> bf16"):
        stage("bf16").pin()


@pytest.mark.slow
def test_local_two_process_ddp_run(inputs: dict[str, Path], tmp_path: Path) -> None:
    """--deepspeed '' is plain DDP; the local backend runs the whole world on this machine."""
    run_dir = tmp_path / "local"
    argv = _argv(
        inputs, run_dir, "--tasks-per-node", "2", "--deepspeed", "", "--max-steps", "6",
        cluster="local",
    )  # fmt: skip
    res = _run(argv)
    assert res.returncode == 0, res.stdout + res.stderr
    engine = json.loads((run_dir / "train" / "engine.json").read_text())
    assert engine["world_size"] == 2 and engine["backend"] == "gloo"
    assert engine["deepspeed"] is False and engine["zero_stage"] is None
    done = json.loads((run_dir / "train" / "COMPLETE").read_text())
    assert done["global_step"] == 6 and done["status"] == "complete"
    assert "train: complete" in res.stdout
    res = _run(argv)
    assert res.returncode == 0 and "already complete" in res.stdout
    subs = json.loads((run_dir / "launch.json").read_text())["stages"]["train"]["submissions"]
    assert len(subs) == 1 and subs[0]["kind"] == "local" and subs[0]["tasks_per_node"] == 2


# --------------------------------------------------------------------------- real Slurm


@pytest.fixture(scope="module")
def reference(slurm_cluster: Any, inputs: dict[str, Path]) -> Path:
    run_dir = inputs["root"] / "reference"
    res = _run(_argv(inputs, run_dir))
    assert res.returncode == 0, res.stdout + res.stderr
    return run_dir


@pytest.mark.slurm
@pytest.mark.slow
def test_two_nodes_zero2_learns_and_adapter_loads(reference: Path, inputs: dict[str, Path]) -> None:
    out = reference / "train"
    engine = json.loads((out / "engine.json").read_text())
    assert engine["zero_stage"] == 2 and engine["deepspeed"] is True  # from the engine itself
    assert engine["world_size"] == 2 and engine["backend"] == "gloo"
    job = _job_id(reference)
    assert "node 0/2" in _log(reference, job, 0) and "node 1/2" in _log(reference, job, 1)
    assert "rendezvous n1:" in _log(reference, job, 1)  # the first node of the allocation

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for key in ("loss", "learning_rate", "tokens_per_s", "step_time_s"):
        assert all(r[key] is not None for r in rows), key
    losses = [r["loss"] for r in rows]
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses

    from peft import PeftModel

    from cot.models import load_model, load_tokenizer

    assert (out / "adapter" / "tokenizer.json").exists()
    tok = load_tokenizer(STUDENT)
    base = load_model(STUDENT, quant="none")
    enc = tok(["What is 1 + 2?"], return_tensors="pt")
    before = base(**enc).logits.detach().clone()
    tuned = PeftModel.from_pretrained(base, str(out / "adapter"))
    after = tuned(**enc).logits.detach()
    assert (out / "adapter" / "adapter_config.json").exists()
    assert float((after - before).abs().max()) > 1e-4
    assert (out / "training_loss.png").stat().st_size > 1000
    assert (out / "config.yaml").exists() and (reference / "config.yaml").exists()
    done = json.loads((out / "COMPLETE").read_text())
    assert done["global_step"] == STEPS and done["attempt"] == 0

    res = _run(_argv(inputs, reference))  # a finished training is not run again
    assert res.returncode == 0 and "already complete" in res.stdout
    subs = json.loads((reference / "launch.json").read_text())["stages"]["train"]["submissions"]
    assert len(subs) == 1 and subs[0]["kind"] == "slurm"


@pytest.mark.slurm
@pytest.mark.slow
def test_preempted_run_requeues_itself_and_matches_reference(
    reference: Path, inputs: dict[str, Path]
) -> None:
    run_dir = inputs["root"] / "preempted"
    proc = _start(_argv(inputs, run_dir))
    job = _job_id(run_dir)
    wait_for(lambda: _steps_logged(run_dir) >= SAVE + 2, 180.0, f"step {SAVE + 2}")
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    _finish(proc, job)
    log = _log(run_dir, job)
    m = re.search(r"preempted at step (\d+)", log)
    assert m, "the signal did not preempt the run (it may have finished first)"
    stopped = int(m.group(1))
    assert SAVE + 2 <= stopped < STEPS
    assert f"checkpoint checkpoint-{stopped} complete" in log
    assert "Requeued job" in log  # submitit's own requeue path
    assert _resumed_from(log) == stopped
    # Both attempts on record, each with its own rendezvous port (SLURM restart + requeue = 2).
    starts = re.findall(r"rendezvous n1:(\d+), attempt (\d+)", _log(run_dir, job, 1))
    assert [a for _, a in starts] == ["0", "2"] and starts[0][0] != starts[1][0]
    done = json.loads((run_dir / "train" / "COMPLETE").read_text())
    assert done["global_step"] == STEPS and done["resumed_from"].endswith(f"-{stopped}")
    assert _adapter_diff(reference, run_dir) <= 1e-6


@pytest.mark.slurm
@pytest.mark.slow
def test_preempted_repeatedly_at_random_points_matches_reference(
    reference: Path, inputs: dict[str, Path]
) -> None:
    """Two USR2 preemptions at random steps in one run; the final adapter is unchanged."""
    rng = random.Random(11)
    run_dir = inputs["root"] / "preempted-twice"
    proc = _start(_argv(inputs, run_dir))
    job = _job_id(run_dir)

    def log() -> str:
        try:
            return _log(run_dir, job)
        except OSError:
            return ""

    first = rng.randint(SAVE + 1, SAVE + 6)
    wait_for(lambda: _steps_logged(run_dir) >= first, 180.0, f"step {first}")
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    wait_for(lambda: "resuming from" in log(), 180.0, "the first resume")
    resumed = _resumed_from(log())
    assert resumed is not None
    second = resumed + rng.randint(2, 4)
    wait_for(lambda: _steps_logged(run_dir) >= second, 180.0, f"step {second} after the resume")
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    _finish(proc, job)
    text = log()
    stops = [int(x) for x in re.findall(r"preempted at step (\d+)", text)]
    assert len(stops) == 2, "both signals must preempt the run (it may have finished first)"
    assert stops[0] < stops[1] < STEPS
    assert len(re.findall(r"resuming from .*checkpoint-(\d+)", text)) == 2
    done = json.loads((run_dir / "train" / "COMPLETE").read_text())
    assert done["global_step"] == STEPS
    assert _adapter_diff(reference, run_dir) <= 1e-6


@pytest.mark.slurm
@pytest.mark.slow
def test_torn_checkpoint_is_skipped_on_resume(reference: Path, inputs: dict[str, Path]) -> None:
    run_dir = runs.make_run_dir(inputs["root"] / "torn")  # as a first launch leaves it
    ckpts = run_dir / "train" / "checkpoints"
    shutil.copytree(reference / "train" / "checkpoints", ckpts)
    last, prev = ckpts / f"checkpoint-{STEPS}", ckpts / f"checkpoint-{STEPS - SAVE}"
    assert (last / "COMPLETE").exists() and (prev / "COMPLETE").exists()
    for optim in (last / f"global_step{STEPS}").glob("*optim_states.pt"):
        optim.unlink()  # files deleted; the marker is still there
    proc = _start(_argv(inputs, run_dir))
    job = _job_id(run_dir)
    _finish(proc, job)
    log = _log(run_dir, job)
    assert f"removing torn checkpoint checkpoint-{STEPS}" in log
    assert _resumed_from(log) == STEPS - SAVE
    assert _adapter_diff(reference, run_dir) <= 1e-6


@pytest.mark.slurm
@pytest.mark.slow
def test_bare_scontrol_requeue_resumes_from_latest_complete_checkpoint(
    slurm_cluster: Any, inputs: dict[str, Path]
) -> None:
    """No checkpoint() call: SIGTERM (ignored), SIGKILL after KillWait=5 s, rerun from disk.

    Long enough (160 steps) that the kill lands mid-training, several seconds after the requeue.
    """
    run_dir = inputs["root"] / "bare"
    proc = _start(_argv(inputs, run_dir, "--max-steps", "160", "--save-steps", "10"))
    job = _job_id(run_dir)
    wait_for(lambda: _steps_logged(run_dir) >= 12, 180.0, "step 12")
    subprocess.run(["scontrol", "requeue", job], check=True)
    _finish(proc, job)
    log = _log(run_dir, job)
    parts = re.split(r"attempt 1\b", log, maxsplit=1)
    assert len(parts) == 2, "the job did not restart"
    first, rest = parts
    completed = [int(s) for s in re.findall(r"checkpoint checkpoint-(\d+) complete", first)]
    assert completed and max(completed) >= 10
    assert "preempted at step" not in first  # no signal went through our save path
    # The newest complete one when killed. Rank 0 writes a checkpoint's marker, rotates, then
    # logs "complete": a SIGKILL in between leaves one more complete checkpoint than logged.
    assert _resumed_from(rest) in (max(completed), max(completed) + 10), completed
    done = json.loads((run_dir / "train" / "COMPLETE").read_text())
    assert done["global_step"] == 160 and done["attempt"] == 1


@pytest.mark.slurm
@pytest.mark.slow
def test_nf4_and_paged_adamw_8bit_forced_on_cpu(
    slurm_cluster: Any, inputs: dict[str, Path]
) -> None:
    run_dir = inputs["root"] / "nf4"
    argv = _argv(inputs, run_dir, "--quant", "nf4", "--optim", "paged_adamw_8bit")
    res = _run([*argv, "--max-steps", "4", "--save-steps", "2"])
    assert res.returncode == 0, res.stdout + res.stderr
    engine = json.loads((run_dir / "train" / "engine.json").read_text())
    assert engine["quantized_4bit"] is True and engine["zero_stage"] == 2
    assert engine["optimizer_class"].startswith("bitsandbytes.")
    assert engine["paged"] is True and engine["optim_bits"] == 8
    rows = [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(0 < r["loss"] < 20 for r in rows)
    assert (run_dir / "train" / "adapter" / "adapter_config.json").exists()
