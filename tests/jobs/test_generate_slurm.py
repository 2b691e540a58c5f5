"""``generate`` end to end on the real test Slurm (tests/slurm_cluster.py), over the tiny teacher.

Every run goes through the CLI (``python -m hpc.launch generate ...``) in a subprocess, exactly as
a user types it, with a ``sbatch`` wrapper first on PATH that logs each call. Outputs are compared
byte for byte with one single-process local run of the same questions (greedy decoding, so the
text of a record depends only on its question, whatever the shard count or batch size).

The whole module runs with ``MaxArraySize=3`` so that the array splitting is exercised by the
8-shard run and at the boundaries (3 and 4 shards). The runs that interrupt a shard do it at
``--batch-size 2`` once the shard file has 2 lines of 48 (or 96), so the hit lands mid-shard.

Expensive runs are module fixtures, each asserted on by one or more tests: ``reference``
(local, 1 shard), ``eight_shard_run`` (SLURM, 8 shards, --wait) and ``interrupted`` (USR2, bare
requeue and kill -9 + relaunch, run side by side since they mostly wait on Slurm).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hpc import shards as S
from tests.slurm_helpers import (
    all_job_ids,
    attempts,
    finish,
    first_lines,
    line_count,
    sacct,
    settled_job_ids,
    submissions,
    wait_for,
)
from tests.slurm_helpers import line_count as sbatch_calls

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "templates" / "prompts" / "teacher.txt"
N_QUESTIONS = 96
MAX_ARRAY_SIZE = 3
INTERRUPT_BATCH = 2
HOSTILE = "run $(touch PWNED) 'q' \"d\""


# --------------------------------------------------------------------------- helpers


@dataclass
class Env:
    """What the tests share: the cluster, inputs, the sbatch wrapper and the jobs to cancel."""

    cluster: Any
    root: Path
    questions: Path
    teacher: Path
    bin: Path
    run_dirs: list[Path] = field(default_factory=list)
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def environ(self, sbatch_log: Path | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            PATH=f"{self.bin}{os.pathsep}{env.get('PATH', '')}",
            PYTHONPATH=str(REPO),
            COT_HPC_POLL_S="2",
            DS_ACCELERATOR="cpu",
            HF_HUB_OFFLINE="1",
            COT_TEST_SBATCH_LOG=str(sbatch_log or self.root / "sbatch.unused.log"),
            **self.cluster.env,
        )
        return env

    def argv(
        self,
        run_dir: Path,
        *,
        shards: int,
        output: Path,
        questions: Path | None = None,
        batch_size: int = INTERRUPT_BATCH,
        cluster: str = "slurm",
        teacher: Path | None = None,
        samples: int = 1,
        temperature: float = 0.0,
    ) -> list[str]:
        argv = [
            sys.executable, "-m", "hpc.launch", "generate",
            "--cluster", cluster,
            "--teacher", str(teacher or self.teacher),
            "--prompt-template", str(TEMPLATE),
            "--input", str(questions or self.questions),
            "--output", str(output),
            "--run-dir", str(run_dir),
            "--shards", str(shards),
            "--batch-size", str(batch_size),
            "--max-new-tokens", "96",
            "--temperature", str(temperature),
            "--samples-per-question", str(samples),
            "--keep", "all",
            "--quant", "none",
            "--seed", "0",
            "--time-min", "60",
            "--cpus-per-task", "1",
            "--signal-delay-s", "30",
            "--max-num-timeout", "3",
            "--local-parallelism", "2",
        ]  # fmt: skip
        if cluster == "slurm":
            argv.append("--wait")
        self.run_dirs.append(run_dir)
        return argv

    def run(
        self,
        argv: list[str],
        *,
        sbatch_log: Path | None = None,
        cwd: Path | None = None,
        timeout: float = 420,
    ) -> subprocess.CompletedProcess[str]:
        proc = self.start(argv, sbatch_log=sbatch_log, cwd=cwd)
        rc, out, err = finish(proc, timeout)
        return subprocess.CompletedProcess(argv, rc, out, err)

    def start(
        self, argv: list[str], *, sbatch_log: Path | None = None, cwd: Path | None = None
    ) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            argv,
            cwd=cwd or self.root,
            env=self.environ(sbatch_log),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        """Kill the launchers still running, then cancel the jobs of every run started so far."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        self.cancel_jobs()

    def cancel_jobs(self) -> None:
        """scancel every job of the runs started so far (by launch.json and by job name)."""
        ids: set[str] = set()
        names = {f"cot-generate {d.name}" for d in self.run_dirs}
        for d in self.run_dirs:
            with contextlib.suppress(OSError, ValueError):
                stage = json.loads((d / "launch.json").read_text())["stages"]["generate"]
                for sub in stage["submissions"]:
                    ids.update(j.split("_")[0] for j in sub.get("shards", {}).values())
                    ids.update(j for j in (sub.get("merge"),) if j)
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                ["squeue", "-h", "-o", "%i|%j"], capture_output=True, text=True, timeout=30
            ).stdout
            for line in out.splitlines():
                jid, _, name = line.partition("|")
                if name in names:
                    ids.add(jid.split("_")[0])
        if ids:
            subprocess.run(["scancel", *sorted(ids)], capture_output=True, timeout=30, check=False)
            # A job cancelled a moment ago can be gone from squeue and not yet in sacct
            # (slurmdbd lags): wait until the cluster's job list has settled, so that a later
            # test does not see these jobs appear as if it had submitted them.
            settled_job_ids(quiet_s=1.0)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def plain_env(
    slurm_cluster: Any,
    tiny_models: Path,
    dataset_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Env]:
    """The cluster as it is (the refusal tests submit nothing, so they need no reconfigure)."""
    root = tmp_path_factory.mktemp("gen")
    questions = first_lines(
        dataset_dir / "raw_questions.jsonl", N_QUESTIONS, root / f"q{N_QUESTIONS}.jsonl"
    )
    folder = root / "bin"
    slurm_cluster.counting_sbatch(folder)
    e = Env(slurm_cluster, root, questions, tiny_models / "teacher", folder)
    try:
        yield e
    finally:
        e.stop()


@pytest.fixture(scope="module")
def env(plain_env: Env, slurm_cluster: Any) -> Iterator[Env]:
    """:func:`plain_env` with MaxArraySize lowered, so that a few shards need several arrays."""
    with slurm_cluster.max_array_size_set(MAX_ARRAY_SIZE):
        yield plain_env


@pytest.fixture()
def cleanup(plain_env: Env) -> Iterator[Env]:
    """Per test: cancel whatever this test left queued or running."""
    yield plain_env
    plain_env.stop()


@pytest.fixture(scope="module")
def reference(env: Env) -> bytes:
    """A single-process local run (1 shard, batch 16): the bytes every other run must equal."""
    run_dir = env.root / "ref"
    out = env.root / "ref.jsonl"
    proc = env.run(env.argv(run_dir, shards=1, output=out, cluster="local", batch_size=16))
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = out.read_bytes()
    assert data.count(b"\n") == N_QUESTIONS
    return data


SAMPLED_QUESTIONS = 24


def sampled_args(env: Env, samples: int) -> dict[str, Any]:
    """The ``argv`` settings of the self-consistency runs (none for the greedy ones)."""
    if samples == 1:
        return {}
    questions = first_lines(
        env.questions, SAMPLED_QUESTIONS, env.root / f"q{SAMPLED_QUESTIONS}.jsonl"
    )
    return {"questions": questions, "samples": samples, "temperature": 0.7}


@pytest.fixture(scope="module")
def sampled_reference(env: Env) -> Path:
    """The uninterrupted self-consistency run: one local process, batch 16, the same seeds."""
    run_dir = env.root / "sampled-ref"
    out = env.root / "sampled-ref.jsonl"
    argv = env.argv(run_dir, shards=1, output=out, cluster="local", batch_size=16,
                    **sampled_args(env, 4))  # fmt: skip
    proc = env.run(argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@dataclass
class Run:
    run_dir: Path
    output: Path
    argv: list[str]
    proc: subprocess.CompletedProcess[str]
    sbatch_log: Path
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(scope="module")
def eight_shard_run(env: Env) -> Run:
    """8 shards on SLURM with --wait, MaxArraySize=3, batch 4."""
    run_dir = env.root / "s8"
    out = env.root / "s8.jsonl"
    log = env.root / "s8.sbatch.log"
    argv = env.argv(run_dir, shards=8, output=out, batch_size=4)
    t0 = time.monotonic()
    proc = env.run(argv, sbatch_log=log)
    return Run(run_dir, out, argv, proc, log, time.monotonic() - t0)


@dataclass
class Scenario:
    """One interrupted run: which shard is hit, how, and what came of it."""

    name: str
    shards: int
    interrupt: Callable[[str, Path, int], None]
    relaunch: bool = False
    questions: int = N_QUESTIONS
    samples: int = 1
    run: Run | None = None
    popen: subprocess.Popen[str] | None = None
    first: subprocess.CompletedProcess[str] | None = None
    problem: str | None = None

    @property
    def shard(self) -> int:
        return self.shards - 1

    @property
    def per_shard(self) -> int:
        return self.questions * self.samples // self.shards


def _usr2(task: str, run_dir: Path, shard: int) -> None:
    subprocess.run(["scancel", "--signal=USR2", task], check=True, timeout=30)


def _requeue(task: str, run_dir: Path, shard: int) -> None:
    subprocess.run(["scontrol", "requeue", task], check=True, timeout=30)


def _kill9(task: str, run_dir: Path, shard: int) -> None:
    pid = int(attempts(run_dir / "generate", shard)[-1][0]["pid"])
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    assert b"submitit" in cmdline, cmdline  # the shard's own python, nothing else
    os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def interrupted(env: Env) -> dict[str, Scenario]:
    """Three runs at once (they spend most of their time waiting on Slurm), each launched with
    --wait at batch 2 and hit once its last shard's file has 2+ lines, i.e. mid-shard:

    * ``usr2``: 2 shards, ``scancel --signal=USR2 <array>_1`` (submitit checkpoint + requeue);
    * ``requeue``: 1 shard of 96, bare ``scontrol requeue <job>``: the task keeps running
      through ``KillWait`` (5 s) after the SIGTERM, so its shard is the long one;
    * ``kill9``: 2 shards, SIGKILL to shard 1's python; once that launcher has exited, the
      same command is run again;
    * ``sampled``: 2 shards of 24 questions x 4 samples at temperature 0.7, USR2 as ``usr2``.
    """
    scenarios = {
        "usr2": Scenario("usr2", 2, _usr2),
        "requeue": Scenario("requeue", 1, _requeue),
        "kill9": Scenario("kill9", 2, _kill9, relaunch=True),
        "sampled": Scenario("sampled", 2, _usr2, questions=SAMPLED_QUESTIONS, samples=4),
    }
    for sc in scenarios.values():
        run_dir = env.root / sc.name
        out = env.root / f"{sc.name}.jsonl"
        log = env.root / f"{sc.name}.sbatch.log"
        argv = env.argv(run_dir, shards=sc.shards, output=out, **sampled_args(env, sc.samples))
        sc.popen = env.start(argv, sbatch_log=log)
        sc.run = Run(run_dir, out, argv, subprocess.CompletedProcess(argv, -1), log)
        sc.run.seconds = time.monotonic()
    end = time.monotonic() + 600
    pending = set(scenarios)
    while pending:
        if time.monotonic() > end:
            pytest.fail(f"interrupted runs not finished after 600 s: {sorted(pending)}")
        for name in sorted(pending):
            sc = scenarios[name]
            assert sc.run is not None and sc.popen is not None
            stage_dir = sc.run.run_dir / "generate"
            exited = sc.popen.poll() is not None
            if "task" not in sc.run.info and not exited:
                lines = line_count(S.shard_path(stage_dir, sc.shard))
                if lines < 2 and not S.marker_path(stage_dir, sc.shard).exists():
                    continue
                if not (sc.run.run_dir / "launch.json").exists():
                    continue
                task = submissions(sc.run.run_dir)[0]["shards"][str(sc.shard)]
                sc.run.info.update(task=task, lines_at_signal=lines)
                if S.marker_path(stage_dir, sc.shard).exists() or lines >= sc.per_shard:
                    sc.problem = f"shard {sc.shard} finished before the interrupt"
                else:
                    sc.interrupt(task, sc.run.run_dir, sc.shard)
                continue
            if not exited:
                continue
            out, err = sc.popen.communicate()
            done = subprocess.CompletedProcess(sc.run.argv, sc.popen.returncode, out, err)
            if "task" not in sc.run.info:
                sc.problem = sc.problem or f"launcher exited before the interrupt: {err[-2000:]}"
            if sc.relaunch and sc.first is None and not sc.problem:
                sc.first = done  # the same command again, at once
                sc.run.info["shard0_done_at_relaunch"] = S.marker_path(stage_dir, 0).exists()
                sc.popen = env.start(sc.run.argv, sbatch_log=sc.run.sbatch_log)
                continue
            sc.run.proc = done
            sc.run.seconds = time.monotonic() - sc.run.seconds
            pending.discard(name)
        time.sleep(0.05)
    return scenarios


def _assert_resumed_once(sc: Scenario, *, same_job: bool) -> None:
    """The hit shard started twice, its first start was cut mid-shard, at most one batch was
    generated twice; every other shard started once."""
    assert sc.run is not None
    run_dir = sc.run.run_dir
    for other in range(sc.shards):
        if other != sc.shard:
            assert len(attempts(run_dir / "generate", other)) == 1
    starts = attempts(run_dir / "generate", sc.shard)
    assert len(starts) == 2, starts
    (first, n1), (second, n2) = starts
    assert 0 < n1 < sc.per_shard + INTERRUPT_BATCH and n2 > 0, (n1, n2)
    duplicates = n1 + n2 - sc.per_shard
    assert 0 <= duplicates <= INTERRUPT_BATCH, f"{duplicates} records generated twice"
    if same_job:  # requeued in place: the same job (or array task), one restart later
        keys = ("job_id", "array_job_id", "array_task_id")
        assert [second[k] for k in keys] == [first[k] for k in keys]
        assert second["restart_count"] == first["restart_count"] + 1
    marker = S.marker_path(run_dir / "generate", sc.shard)
    sealed = json.loads(marker.read_text())
    assert (sealed["records"], sealed["errors"]) == (sc.per_shard, 0)
    assert sealed["bytes"] == S.shard_path(marker.parent.parent, int(marker.name)).stat().st_size


@pytest.fixture(scope="module")
def preempted_run(interrupted: dict[str, Scenario]) -> Run:
    run = interrupted["usr2"].run
    assert run is not None
    return run


# --------------------------------------------------------------------------- results


@pytest.mark.slow
def test_eight_shards_equal_local_and_single_process(
    env: Env, reference: bytes, eight_shard_run: Run, cleanup: Env
) -> None:
    run = eight_shard_run
    assert run.proc.returncode == 0, run.proc.stderr[-3000:]
    # --wait returned only once the merge job was done.
    assert (run.run_dir / "generate" / "merge.json").exists()
    assert f"merged {N_QUESTIONS} of {N_QUESTIONS} records" in run.proc.stdout
    assert run.output.read_bytes() == reference
    assert S.completed(run.run_dir / "generate") == set(range(8))
    assert all(len(attempts(run.run_dir / "generate", i)) == 1 for i in range(8))
    (sub,) = submissions(run.run_dir)
    states = dict((jid, st) for jid, st in sacct([*sub["arrays"], sub["merge"]]))
    assert states[sub["merge"]] == "COMPLETED"
    assert all(states[j] == "COMPLETED" for j in sub["shards"].values())

    local_dir = env.root / "l8"
    local_out = env.root / "l8.jsonl"
    proc = env.run(env.argv(local_dir, shards=8, output=local_out, cluster="local", batch_size=4))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert submissions(local_dir)[0]["kind"] == "local"
    assert local_out.read_bytes() == reference


@pytest.mark.slow
def test_eight_shards_split_into_three_arrays(eight_shard_run: Run, cleanup: Env) -> None:
    run = eight_shard_run
    assert run.proc.returncode == 0, run.proc.stderr[-3000:]
    (sub,) = submissions(run.run_dir)
    assert len(sub["arrays"]) == 3
    assert sbatch_calls(run.sbatch_log) == 3 + 1  # three arrays, one merge
    by_array: dict[str, list[int]] = {}
    for _, jid in sorted(sub["shards"].items(), key=lambda kv: int(kv[0])):
        root, _, task = jid.partition("_")
        by_array.setdefault(root, []).append(int(task))
    assert [by_array[a] for a in sub["arrays"]] == [[0, 1, 2], [0, 1, 2], [0, 1]]
    # Slurm agrees: every task of every array ran to completion.
    rows = sacct(sub["arrays"])
    assert sorted(j for j, _ in rows) == sorted(sub["shards"].values())
    assert {st for _, st in rows} == {"COMPLETED"}


@pytest.mark.slow
@pytest.mark.parametrize(("shards", "arrays"), [(MAX_ARRAY_SIZE, 1), (MAX_ARRAY_SIZE + 1, 2)])
def test_array_split_at_max_array_size_with_hostile_names(
    env: Env, reference: bytes, cleanup: Env, shards: int, arrays: int
) -> None:
    """N == MaxArraySize -> 1 array, N == MaxArraySize + 1 -> 2 arrays; and run folder, output
    and job name with spaces, quotes and ``$(...)`` reach Slurm verbatim and run nothing."""
    n = 2 * shards
    questions = env.root / f"q{n}.jsonl"
    questions.write_text("".join(env.questions.read_text().splitlines(keepends=True)[:n]))
    run_dir = env.root / f"{HOSTILE} {shards}"
    output = env.root / f"out $(touch PWNED) 'x' {shards}.jsonl"
    cwd = env.root / f"cwd{shards}"
    cwd.mkdir()
    log = env.root / f"hostile{shards}.sbatch.log"
    argv = env.argv(run_dir, shards=shards, output=output, questions=questions)
    proc = env.run(argv, sbatch_log=log, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert output.read_bytes() == b"".join(reference.splitlines(keepends=True)[:n])
    assert S.completed(run_dir / "generate") == set(range(shards))

    (sub,) = submissions(run_dir)
    assert len(sub["arrays"]) == arrays
    assert sbatch_calls(log) == arrays + 1
    rows = sacct([*sub["arrays"], sub["merge"]], "JobID,JobName,State")
    assert len(rows) == shards + 1
    assert {st for _, _, st in rows} == {"COMPLETED"}
    # The job name reached Slurm verbatim (the controller's view; slurmdbd, and so sacct,
    # stores a double quote as a backtick).
    name = f"cot-generate {run_dir.name}"
    assert {n for _, n, _ in rows} == {name.replace('"', "`")}
    for jid in (*sub["arrays"], sub["merge"]):
        shown = subprocess.run(
            ["scontrol", "-o", "show", "job", jid], capture_output=True, text=True, check=True
        ).stdout
        names = re.findall(r"JobName=(.*?) UserId=", shown)
        assert names and set(names) == {name}, shown[:500]
    assert (run_dir / "logs").is_dir() and any((run_dir / "logs").glob("*_log.out"))

    pwned = [p for p in env.root.rglob("PWNED*")]
    for d in (cwd, REPO, Path.home(), Path("/tmp"), Path("/"), env.cluster.state_dir):
        pwned += list(d.glob("PWNED*"))
    pwned += list(env.cluster.state_dir.rglob("PWNED*"))
    assert pwned == []


# --------------------------------------------------------------------------- interruptions


@pytest.mark.slow
def test_usr2_preemption_mid_shard_resumes_byte_identical(
    reference: bytes, interrupted: dict[str, Scenario], cleanup: Env
) -> None:
    sc = interrupted["usr2"]
    assert sc.run is not None and sc.problem is None, sc.problem
    assert sc.run.proc.returncode == 0, sc.run.proc.stderr[-3000:]
    assert sc.run.output.read_bytes() == reference
    _assert_resumed_once(sc, same_job=True)
    # submitit's handler ran: checkpoint(), then its own requeue of the same task.
    log = (sc.run.run_dir / "logs" / f"{sc.run.info['task']}_0_log.err").read_text()
    assert "Caught signal SIGUSR2" in log and "this job is preempted" in log
    assert sbatch_calls(sc.run.sbatch_log) == 2  # one array, one merge: a requeue is no sbatch


@pytest.mark.slow
def test_four_samples_preempted_mid_shard_equal_an_uninterrupted_run_and_vote(
    env: Env, sampled_reference: Path, interrupted: dict[str, Scenario], cleanup: Env
) -> None:
    sc = interrupted["sampled"]
    assert sc.run is not None and sc.problem is None, sc.problem
    assert sc.run.proc.returncode == 0, sc.run.proc.stderr[-3000:]
    reference = (sampled_reference / "generate" / "merged.jsonl").read_bytes()
    assert sc.run.output.read_bytes() == reference  # batch 2, 2 shards, a requeue: same bytes
    _assert_resumed_once(sc, same_job=True)
    records = [json.loads(x) for x in reference.splitlines()]
    assert len(records) == SAMPLED_QUESTIONS * 4
    by_id: dict[str, list[str]] = {}
    for rec in records:
        by_id.setdefault(rec["id"], []).append(rec["cot"])
    assert [len(v) for v in by_id.values()] == [4] * SAMPLED_QUESTIONS
    assert any(len(set(v)) > 1 for v in by_id.values())  # the samples really differ
    # Self-consistency on both: the same majority filter and the same votes.
    kept = {}
    for run_dir in (sampled_reference, sc.run.run_dir):
        out = run_dir.parent / f"{run_dir.name}.majority.jsonl"
        proc = env.run(
            [sys.executable, "-m", "hpc.launch", "merge", str(run_dir), "--keep", "majority",
             "--output", str(out)]
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "majority vote over 24 questions" in proc.stdout, proc.stdout
        summary = json.loads((run_dir / "generate" / "merge.json").read_text())
        kept[run_dir.name] = (out.read_bytes(), summary["majority"], summary["per_category"])
    assert kept["sampled-ref"] == kept["sampled"]
    data, vote, per_cat = kept["sampled"]
    assert vote["questions"] == SAMPLED_QUESTIONS
    assert sum(k for k, _ in per_cat.values()) == data.count(b"\n")
    assert sum(t for _, t in per_cat.values()) == SAMPLED_QUESTIONS * 4


@pytest.mark.slow
def test_bare_scontrol_requeue_mid_shard_resumes_byte_identical(
    reference: bytes, interrupted: dict[str, Scenario], cleanup: Env
) -> None:
    sc = interrupted["requeue"]
    assert sc.run is not None and sc.problem is None, sc.problem
    assert sc.run.proc.returncode == 0, sc.run.proc.stderr[-3000:]
    assert sc.run.output.read_bytes() == reference
    _assert_resumed_once(sc, same_job=True)
    log = (sc.run.run_dir / "logs" / f"{sc.run.info['task']}_0_log.err").read_text()
    assert "Caught signal SIGUSR2" not in log  # checkpoint() was skipped: disk resume only
    assert sbatch_calls(sc.run.sbatch_log) == 2


@pytest.mark.slow
def test_kill_9_then_relaunch_reruns_only_that_shard(
    reference: bytes, interrupted: dict[str, Scenario], cleanup: Env
) -> None:
    sc = interrupted["kill9"]
    assert sc.run is not None and sc.problem is None, sc.problem
    run, first_launch = sc.run, sc.first
    assert first_launch is not None
    # The --wait launcher sees the task fail for good and says which shard and where its log is.
    assert first_launch.returncode == 1, first_launch.stdout[-2000:] + first_launch.stderr[-2000:]
    log = run.run_dir / "logs" / f"{run.info['task']}_0_log.err"
    assert "shard 00001" in first_launch.stderr and f"log: {log}" in first_launch.stderr
    assert log.exists()

    # The very same command again: only shard 1 is submitted, and it resumes from disk.
    assert run.proc.returncode == 0, run.proc.stderr[-3000:]
    assert run.output.read_bytes() == reference
    first, second = submissions(run.run_dir)
    assert list(second["shards"]) == ["1"]  # shard 0 is done, or still running and waited on
    # Whether shard 0 was still running is what the relaunch saw when it planned, not what this
    # test saw a moment before starting it (shard 0 can finish in between).
    saw = re.search(r"generate: 2 shards, (\d) to run", run.proc.stdout)
    assert saw is not None and saw.group(1) in ("1", "2"), run.proc.stdout
    if saw.group(1) == "2":
        # The new merge waits on task 0 of the old array (afterok on that whole array could
        # never be met now that its task 1 failed).
        assert f"not resubmitted: 00000 (job {first['shards']['0']})" in run.proc.stdout
    assert second["shards"]["1"] != first["shards"]["1"]
    _assert_resumed_once(sc, same_job=False)
    restart = attempts(run.run_dir / "generate", 1)[1][0]
    # (one shard is submitted as a plain job, not as an array of one)
    assert (restart["array_job_id"] or restart["job_id"]) == second["shards"]["1"].split("_")[0]
    assert sbatch_calls(run.sbatch_log) == 2 + 2  # (array + merge) twice


@pytest.mark.slow
def test_wait_exits_non_zero_naming_the_failed_shard_and_log(env: Env, cleanup: Env) -> None:
    """The teacher exists at launch (so validation passes) and is gone when the tasks start."""
    teacher = env.root / "teacher-vanishing"
    shutil.copytree(env.teacher, teacher)
    questions = env.root / "q4.jsonl"
    questions.write_text("".join(env.questions.read_text().splitlines(keepends=True)[:4]))
    run_dir = env.root / "fails"
    out = env.root / "fails.jsonl"
    argv = env.argv(run_dir, shards=2, output=out, questions=questions, teacher=teacher)
    proc = env.start(argv)
    wait_for(lambda: (run_dir / "launch.json").exists() or proc.poll() is not None, 60, "submit")
    teacher.rename(teacher.with_name("teacher-gone"))
    rc, stdout, stderr = finish(proc, timeout=180)
    assert rc == 1, stdout[-2000:] + stderr[-2000:]
    assert "failed for good" in stderr
    (sub,) = submissions(run_dir)
    named = [i for i in range(2) if f"shard {S.shard_name(i)}" in stderr]
    assert named
    for i in named:
        log = run_dir / "logs" / f"{sub['shards'][str(i)]}_0_log.err"
        assert f"log: {log}" in stderr
        assert str(teacher) in log.read_text()
    assert not out.exists()
    assert S.completed(run_dir / "generate") == set()


# --------------------------------------------------------------------------- refusals


BAD_INPUTS: dict[str, tuple[str, int, str]] = {
    # name: (file content, --shards, expected message after the path)
    "malformed_json": (
        '{"question": "a?"}\n{"question": "b?"}\n{"question": "c?"\n{"question": "d?"}\n',
        1,
        r":3: invalid JSON",
    ),
    "missing_question": (
        '{"question": "a?"}\n{"id": "b", "text": "b?"}\n',
        1,
        ":2: field 'question'",
    ),
    "empty_file": ("", 1, ": file is empty"),
    "more_shards_than_records": (
        '{"question": "a?"}\n{"question": "b?"}\n{"question": "c?"}\n',
        5,
        ": 5 shards for 3 records",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_refused_before_anything_is_submitted(cleanup: Env, case: str) -> None:
    env = cleanup
    content, shards, message = BAD_INPUTS[case]
    bad = env.root / f"bad {case}.jsonl"
    bad.write_text(content)
    run_dir = env.root / f"bad-{case}"
    output = env.root / f"bad-{case}.out.jsonl"
    output.write_text("KNOWN CONTENT\n")
    log = env.root / f"bad-{case}.sbatch.log"
    before = all_job_ids()
    proc = env.run(env.argv(run_dir, shards=shards, output=output, questions=bad), sbatch_log=log)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{bad}{message}" in proc.stderr, proc.stderr
    assert output.read_text() == "KNOWN CONTENT\n"
    assert not (run_dir / "launch.json").exists()
    assert not (run_dir / "generate" / "plan.json").exists()
    assert not log.exists()
    assert all_job_ids() == before


@pytest.mark.slow
def test_relaunch_other_input_or_shards_refused_identical_submits_nothing(
    env: Env, eight_shard_run: Run, cleanup: Env
) -> None:
    run = eight_shard_run
    assert run.proc.returncode == 0, run.proc.stderr[-3000:]
    launch = (run.run_dir / "launch.json").read_text()
    plan = (run.run_dir / "generate" / "plan.json").read_text()
    output = run.output.read_bytes()
    log = env.root / "relaunch.sbatch.log"
    before = all_job_ids()

    other = env.root / "q95.jsonl"
    other.write_text("".join(env.questions.read_text().splitlines(keepends=True)[:95]))
    argv = list(run.argv)
    argv[argv.index("--input") + 1] = str(other)
    proc = env.run(argv, sbatch_log=log)
    assert proc.returncode == 2
    assert "refusing to relaunch into this run folder" in proc.stderr
    assert f"input {other}" in proc.stderr and "differs from the planned input" in proc.stderr

    argv = list(run.argv)
    argv[argv.index("--shards") + 1] = "4"
    proc = env.run(argv, sbatch_log=log)
    assert proc.returncode == 2
    assert "--shards 4 differs from the planned 8" in proc.stderr

    for _ in range(2):
        assert (run.run_dir / "launch.json").read_text() == launch
        assert (run.run_dir / "generate" / "plan.json").read_text() == plan
        assert run.output.read_bytes() == output
        proc = env.run(run.argv, sbatch_log=log)  # identical command after completion
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "8 shards, 0 to run" in proc.stdout
    assert not log.exists()
    assert all_job_ids() == before


# --------------------------------------------------------------------------- status


@pytest.mark.slow  # its fixture preempts a real run (about 25 s)
def test_status_after_a_preempted_run_one_sacct_call(
    env: Env, preempted_run: Run, cleanup: Env
) -> None:
    run = preempted_run
    assert run.proc.returncode == 0, run.proc.stderr[-3000:]
    folder = env.root / "sacct-bin"
    folder.mkdir(exist_ok=True)
    calls = env.root / "sacct.calls"
    real = shutil.which("sacct")
    (folder / "sacct").write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexec {real} "$@"\n')
    (folder / "sacct").chmod(0o755)
    environ = env.environ()
    environ["PATH"] = f"{folder}{os.pathsep}{environ['PATH']}"
    proc = subprocess.run(
        [sys.executable, "-m", "hpc.launch", "status", str(run.run_dir)],
        cwd=env.root, env=environ, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (sub,) = submissions(run.run_dir)
    text = proc.stdout
    assert "shards 2/2 done  0 running  0 pending  0 failed" in text
    assert f"records {N_QUESTIONS}/{N_QUESTIONS}  requeues 1  merge COMPLETED" in text
    assert f"jobs {sub['arrays'][0]} (slurm)  merge job {sub['merge']}" in text
    assert len(calls.read_text().splitlines()) == 1
