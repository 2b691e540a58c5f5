"""The one facade over ``submitit.AutoExecutor``: the only module that knows SLURM parameters.

It picks the backend (``auto`` means SLURM only when a controller answers ``scontrol ping``),
maps a stage's :class:`hpc.config.ClusterFields` onto submitit parameters, submits N shards as
one array (several when N exceeds ``MaxArraySize``), chains dependencies with ``afterok`` and,
on the local backend, runs at most ``local_parallelism`` tasks at once.

Nothing here builds a shell string: submitit writes the sbatch file with every value quoted
(``shlex.quote``) and runs ``sbatch FILE`` without a shell, so names and paths with spaces,
quotes or ``$(...)`` reach Slurm verbatim.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hpc.config import REPO_ROOT, ClusterFields

DEFAULT_MAX_ARRAY_SIZE = 1001  # Slurm's own default


def controller_answers(timeout_s: float = 10.0) -> bool:
    """True when ``scontrol ping`` reaches a running slurmctld."""
    if shutil.which("scontrol") is None:
        return False
    try:
        out = subprocess.run(
            ["scontrol", "ping"], capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "UP" in out.stdout


def choose_cluster(requested: str, *, announce: bool = True) -> str:
    """Resolve ``auto|slurm|local`` to ``slurm`` or ``local``; say which one was chosen."""
    if requested == "auto":
        kind = "slurm" if controller_answers() else "local"
        why = "a SLURM controller answers" if kind == "slurm" else "no SLURM controller answers"
    else:
        kind, why = requested, "as requested"
    if announce:
        print(f"cluster: {kind} ({why})", file=sys.stderr)
    return kind


@functools.lru_cache(maxsize=1)
def max_array_size() -> int:
    """The cluster's ``MaxArraySize`` (array indexes run 0 .. MaxArraySize-1)."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "config"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return DEFAULT_MAX_ARRAY_SIZE
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.MULTILINE)
    return int(m.group(1)) if m else DEFAULT_MAX_ARRAY_SIZE


def chunks(n: int, size: int) -> list[range]:
    """Split ``range(n)`` into consecutive ranges of at most ``size``."""
    return [range(i, min(n, i + size)) for i in range(0, n, size)]


def job_env_setup(cfg: ClusterFields) -> dict[str, str]:
    """Environment every job gets: unbuffered logs, offline hub, thread count, importable repo."""
    env = {
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(cfg.cpus_per_task),
    }
    if "DS_ACCELERATOR" in os.environ:  # never force DeepSpeed's CPU backend onto GPU nodes
        env["DS_ACCELERATOR"] = os.environ["DS_ACCELERATOR"]
    return env


class Executor:
    """Submit one stage's jobs to SLURM or to local processes, with one interface.

    Args:
        cfg: the stage's cluster settings.
        folder: where submitit keeps pickles and ``<job_id>_<task>_log.out|err`` (0700).
        name: the job name (any characters; it is passed quoted).
        kind: ``slurm``/``local``; resolved from ``cfg.cluster`` when not given.
    """

    def __init__(self, cfg: ClusterFields, folder: Path, name: str, kind: str | None = None):
        self.cfg = cfg
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)  # it holds pickles of configs
        self.name = name
        self.kind = kind or choose_cluster(cfg.cluster)
        if self.kind == "slurm" and cfg.time_min * 60 <= cfg.signal_delay_s + 30:
            # slurmctld checks signal timers every ~30 s and sends USR2 at the first check with
            # at most delay + 30 s left: with a shorter limit every attempt is cut at once.
            print(
                f"warning: --time-min {cfg.time_min} leaves no working time before the USR2 "
                f"sent {cfg.signal_delay_s} s (+ up to 30 s) before the limit; every attempt "
                "would be checkpointed and requeued at once. Raise --time-min or lower "
                "--signal-delay-s.",
                file=sys.stderr,
            )

    def _executor(
        self,
        *,
        nodes: int = 1,
        tasks_per_node: int = 1,
        gpus: int | None = None,
        dependency: Sequence[str] = (),
        parallelism: int | None = None,
    ) -> Any:
        import submitit

        cfg = self.cfg
        ex = submitit.AutoExecutor(
            folder=str(self.folder), cluster=self.kind, slurm_max_num_timeout=cfg.max_num_timeout
        )
        env = job_env_setup(cfg)
        gpus_per_node = cfg.gpus_per_task * tasks_per_node if gpus is None else gpus
        params: dict[str, Any] = {
            "name": self.name,
            "timeout_min": cfg.time_min,
            "nodes": nodes,
            "tasks_per_node": tasks_per_node,
            "cpus_per_task": cfg.cpus_per_task,
        }
        if self.kind == "slurm":
            params["slurm_signal_delay_s"] = cfg.signal_delay_s
            if gpus_per_node:
                params["gpus_per_node"] = gpus_per_node
            if cfg.mem_gb:
                params["mem_gb"] = cfg.mem_gb
            for key in ("partition", "account", "qos"):
                if getattr(cfg, key):
                    params[f"slurm_{key}"] = getattr(cfg, key)
            if parallelism:
                params["slurm_array_parallelism"] = parallelism
            if dependency:
                params["slurm_additional_parameters"] = {
                    "dependency": "afterok:" + ":".join(dependency),
                    "kill-on-invalid-dep": "yes",
                }
            repo = str(REPO_ROOT)
            exports = [f"export {k}={_sh(v)}" for k, v in env.items()]
            exports.append(f"export PYTHONPATH={_sh(repo)}${{PYTHONPATH:+:$PYTHONPATH}}")
            params["slurm_setup"] = exports
            if nodes * tasks_per_node > 1:
                # One crashed rank ends the step instead of leaving the others in a collective.
                params["slurm_srun_args"] = ["--kill-on-bad-exit=1"]
        else:
            if gpus_per_node:
                params["gpus_per_node"] = gpus_per_node
            os.environ.update({k: v for k, v in env.items() if k not in ("OMP_NUM_THREADS",)})
            pp = os.environ.get("PYTHONPATH", "")
            if str(REPO_ROOT) not in pp.split(os.pathsep):
                os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), pp) if p)
        ex.update_parameters(**params)
        return ex

    def submit(
        self,
        fn: Callable[..., Any],
        *args: Any,
        nodes: int = 1,
        tasks_per_node: int = 1,
        dependency: Sequence[str] = (),
        gpus: int | None = None,
    ) -> Any:
        """Submit one job (all its nodes and tasks run ``fn(*args)``)."""
        ex = self._executor(
            nodes=nodes, tasks_per_node=tasks_per_node, gpus=gpus, dependency=dependency
        )
        job = ex.submit(fn, *args)
        return job

    def submit_array(
        self,
        calls: Sequence[tuple[Callable[..., Any], tuple[Any, ...]]],
        *,
        dependency: Sequence[str] = (),
    ) -> list[Any]:
        """Submit calls as one SLURM array per ``MaxArraySize`` chunk; returns the jobs.

        On the local backend this *starts* at most ``local_parallelism`` jobs; call
        :meth:`drain_local` to run the rest.
        """
        if self.kind != "slurm":
            self._pending = list(calls)
            self._running: list[Any] = []
            self._all: list[Any] = []
            self._fill_local()
            return self._all
        limit = max_array_size()
        jobs: list[Any] = []
        for part in chunks(len(calls), limit):
            ex = self._executor(dependency=dependency, parallelism=self.cfg.array_parallelism)
            with ex.batch():
                for i in part:
                    fn, args = calls[i]
                    jobs.append(ex.submit(fn, *args))
        return jobs

    def _fill_local(self) -> None:
        ex = None
        while self._pending and len(self._running) < self.cfg.local_parallelism:
            ex = ex or self._executor()
            fn, args = self._pending.pop(0)
            job = ex.submit(fn, *args)
            self._running.append(job)
            self._all.append(job)

    def drain_local(self, on_poll: Callable[[], None] | None = None, poll_s: float = 1.0) -> None:
        """Local backend: keep ``local_parallelism`` jobs running until every call has run."""
        while self._pending or self._running:
            self._running = [j for j in self._running if not j.done()]
            self._fill_local()
            if on_poll:
                on_poll()
            if self._pending or self._running:
                time.sleep(poll_s)


def _sh(value: str) -> str:
    import shlex

    return shlex.quote(value)


def job_ids(jobs: Sequence[Any]) -> list[str]:
    """The distinct SLURM job ids to depend on (an array's tasks share its array id)."""
    out: list[str] = []
    for j in jobs:
        jid = str(j.job_id).split("_")[0]
        if jid not in out:
            out.append(jid)
    return out


ACTIVE_STATES = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "RESIZING",
    "SUSPENDED",
    "CONFIGURING",
    "COMPLETING",
    "SIGNALING",
    "STAGE_OUT",
}
FAILED_STATES = {
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "REVOKED",
}


def _expand(job_id: str) -> list[str]:
    """``12_[0-3,7%2]`` -> ``12_0 .. 12_3, 12_7``; plain ids pass through."""
    m = re.fullmatch(r"(\d+)_\[([^\]]+)\]", job_id)
    if not m:
        return [job_id]
    base, spec = m.group(1), m.group(2).split("%")[0]
    out = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out += [f"{base}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def job_states(ids: Sequence[str]) -> dict[str, str] | None:
    """States of jobs and array tasks by id, from ONE batched ``sacct`` call.

    Returns None when sacct cannot answer (no accounting), so callers can say "unknown".
    """
    roots = sorted({str(i).split("_")[0] for i in ids if i})
    if not roots or shutil.which("sacct") is None:
        return {} if not roots else None
    try:
        out = subprocess.run(
            ["sacct", "-n", "-P", "-X", "--format=JobID,State", "-j", ",".join(roots)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    states: dict[str, str] = {}
    for line in out.splitlines():
        if "|" not in line:
            continue
        jid, state = line.split("|", 1)
        for one in _expand(jid.strip()):
            states[one] = state.split()[0] if state.strip() else "UNKNOWN"
    return states


def live_jobs(ids: Sequence[str]) -> set[str]:
    """Which of ``ids`` are queued or running: from sacct, or from squeue when sacct can't answer.

    Relaunching must never resubmit a shard whose earlier task is still alive (two tasks would
    then append to one shard file), so when neither tool answers this raises instead of guessing.
    """
    ids = [str(i) for i in ids if i]
    if not ids:
        return set()
    states = job_states(ids)
    if states is not None:
        return {i for i in ids if states.get(i, "") in ACTIVE_STATES}
    roots = sorted({i.split("_")[0] for i in ids})
    try:
        out = subprocess.run(
            ["squeue", "-h", "-o", "%i", "-j", ",".join(roots)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"neither sacct nor squeue answers ({e}); cannot tell live jobs") from e
    if out.returncode != 0 and "Invalid job id" not in out.stderr:
        raise RuntimeError(f"neither sacct nor squeue answers: {out.stderr.strip()}")
    queued = {one for line in out.stdout.split() for one in _expand(line.strip())}
    return {i for i in ids if i in queued or (i.split("_")[0] in queued and "_" not in i)}
