"""The SLURM backend: submitit's ``SlurmExecutor`` underneath, ``sacct``/``squeue`` to poll.

The only module that knows SLURM parameters. It maps a stage's :class:`ClusterFields` onto
submitit's, submits N calls as one array (several when N exceeds ``MaxArraySize``), chains a
dependency with ``afterok`` (``afterany`` for a step that checks its inputs itself) and
``kill-on-invalid-dep``, and reads states with one batched
``sacct`` call. Nothing here builds a shell string: submitit writes the sbatch file with every
value quoted (``shlex.quote``) and runs ``sbatch FILE`` without a shell; values that could break
out of an ``#SBATCH`` line (newlines) are refused before submission.
"""

from __future__ import annotations

import functools
import logging
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

from hpc.backends.base import (
    ACTIVE_STATES,
    FAILED_STATES,
    Backend,
    Call,
    DependencyFailed,
    Failure,
    Handle,
    Resources,
    Spec,
    env_exports,
    failure_line,
    poll_interval,
)
from hpc.config import SBATCH_UNSAFE, ClusterFields
from hpc.errors import ConfigError, SchedulerError, StageFailed
from hpc.layout import RunLayout

log = logging.getLogger(__name__)
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


def root_ids(ids: Sequence[str]) -> list[str]:
    """The distinct SLURM job ids to depend on (an array's tasks share its array id)."""
    out: list[str] = []
    for j in ids:
        jid = str(j).split("_")[0]
        if jid not in out:
            out.append(jid)
    return out


def expand(job_id: str) -> list[str]:
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
        for one in expand(jid.strip()):
            states[one] = state.split()[0] if state.strip() else "UNKNOWN"
    return states


def queued(ids: Sequence[str]) -> set[str]:
    """Which of ``ids`` ``squeue`` lists (queued or running); raises when squeue cannot answer."""
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
        raise SchedulerError(f"squeue does not answer ({e}); cannot tell live jobs") from e
    if out.returncode != 0 and "Invalid job id" not in out.stderr:
        raise SchedulerError(f"squeue does not answer: {out.stderr.strip()}")
    listed = {one for line in out.stdout.split() for one in expand(line.strip())}
    return {i for i in ids if i in listed}


def live_jobs(ids: Sequence[str]) -> set[str]:
    """Which of ``ids`` are queued or running: from sacct, and from squeue for what sacct lacks.

    Relaunching must never resubmit a shard whose earlier task is still alive (two tasks would
    then append to one shard file). A job sacct does not list (slurmdbd lagging) is unknown,
    not dead, so squeue is asked about it; when neither answers this raises instead of guessing.
    """
    ids = [str(i) for i in ids if i]
    if not ids:
        return set()
    states = job_states(ids)
    if states is None:
        return queued(ids)
    alive = {i for i in ids if states.get(i, "") in ACTIVE_STATES}
    unknown = [i for i in ids if i not in states]
    if unknown:
        alive |= queued(unknown)
    return alive


class SlurmHandle(Handle):
    """Jobs on SLURM: submitit job objects when this launch submitted them, bare ids otherwise."""

    def __init__(
        self, layout: RunLayout, ids: Sequence[str], labels: Sequence[str], jobs: Sequence[Any] = ()
    ):
        self.layout, self._ids, self.labels, self._jobs = (
            layout,
            list(ids),
            list(labels),
            list(jobs),
        )
        self._states: dict[str, str] = {}

    @property
    def job_ids(self) -> list[str]:
        return list(self._ids)

    @property
    def dependency(self) -> list[str]:
        # A task of an earlier array is waited on by its own id (``12_3``): ``afterok`` on the
        # whole array could never be met once one of its other tasks failed for good.
        return root_ids(self._ids) if self._jobs else list(dict.fromkeys(self._ids))

    @property
    def new(self) -> bool:
        return bool(self._jobs)

    @property
    def arrays(self) -> list[str]:
        return root_ids(self._ids) if self._jobs else []

    def refresh(self) -> dict[str, str]:
        """Poll sacct once for every job of this handle."""
        got = job_states(self._ids)
        self._states = {i: (got or {}).get(i, "UNKNOWN") for i in self._ids}
        return self._states

    def states(self) -> dict[str, str]:
        if not self._states:
            self.refresh()
        pairs = zip(self.labels, self._ids, strict=True)
        return {label: self._states[i] for label, i in pairs}  # refresh() names every id

    def wait(self, on_poll: Callable[[], None] | None = None) -> None:
        while True:
            states = self.refresh()
            if on_poll:
                on_poll()
            if all(s not in ACTIVE_STATES and s != "UNKNOWN" for s in states.values()):
                return
            if self._jobs and all(j.done(force_check=True) for j in self._jobs):
                return
            time.sleep(poll_interval())

    def results(self) -> list[Any]:
        if not self._jobs:
            raise StageFailed("no results: these jobs were submitted by an earlier launch")
        try:
            return [j.results()[0] for j in self._jobs]
        except Exception as e:  # any job failure is reported with its logs
            raise StageFailed(f"job failed: {failure_line(str(e))}") from None

    def failures(self) -> list[Failure]:
        self.states()
        return [
            Failure(label, i, s, self.layout.job_log(i), f"job {i} {s}")
            for label, i in zip(self.labels, self._ids, strict=True)
            if (s := self._states[i]) in FAILED_STATES
        ]


class SlurmBackend(Backend):
    """Submit to SLURM through submitit."""

    def __init__(self, layout: RunLayout, why: str = "as requested"):
        super().__init__(layout)
        self.kind, self.why = "slurm", why

    @property
    def poll_s(self) -> float:
        return poll_interval()

    def check(self, cfg: ClusterFields) -> None:
        if cfg.time_min * 60 <= cfg.signal_delay_s + 30:
            # slurmctld checks signal timers every ~30 s and sends USR2 at the first check with
            # at most delay + 30 s left: with a shorter limit every attempt is cut at once.
            log.warning(
                f"warning: --time-min {cfg.time_min} leaves no working time before the USR2 "
                f"sent {cfg.signal_delay_s} s (+ up to 30 s) before the limit; every attempt "
                "would be checkpointed and requeued at once. Raise --time-min or lower "
                "--signal-delay-s."
            )

    def _executor(
        self,
        cfg: ClusterFields,
        name: str,
        res: Resources,
        dependency: Sequence[str],
        parallelism: int | None,
        after_any: bool = False,
    ) -> Any:
        import submitit

        folder = self.layout.logs
        for what, value in (("job name", name), ("log folder", str(folder))):
            if any(c in value for c in SBATCH_UNSAFE):
                raise ConfigError(
                    f"{what} {value!r} contains a newline, carriage return or NUL; "
                    "it would break the sbatch script"
                )
        ex = submitit.AutoExecutor(
            folder=str(folder), cluster="slurm", slurm_max_num_timeout=cfg.max_num_timeout
        )
        params: dict[str, Any] = {
            "name": name,
            "timeout_min": cfg.time_min,
            "nodes": res.nodes,
            "tasks_per_node": res.tasks_per_node,
            "cpus_per_task": cfg.cpus_per_task,
            "slurm_signal_delay_s": cfg.signal_delay_s,
            "slurm_setup": env_exports(cfg),
        }
        if res.gpus_per_node:
            params["gpus_per_node"] = res.gpus_per_node
        if cfg.mem_gb:
            params["mem_gb"] = cfg.mem_gb
        for key in ("partition", "account", "qos"):
            if getattr(cfg, key):
                params[f"slurm_{key}"] = getattr(cfg, key)
        if parallelism:
            params["slurm_array_parallelism"] = parallelism
        if dependency:
            params["slurm_additional_parameters"] = {
                "dependency": ("afterany:" if after_any else "afterok:") + ":".join(dependency),
                "kill-on-invalid-dep": "yes",
            }
        if res.nodes * res.tasks_per_node > 1:
            # One crashed rank ends the step instead of leaving the others in a collective.
            params["slurm_srun_args"] = ["--kill-on-bad-exit=1"]
        ex.update_parameters(**params)
        return ex

    def _submit(self, calls: list[Call], spec: Spec) -> Handle:
        cfg, name, resources, after = spec.cfg, spec.name, spec.resources, spec.after
        on_submit = spec.on_submit  # inline: a job all the same (a login node is no worker)
        self.layout.logs.mkdir(parents=True, exist_ok=True)
        self.layout.logs.chmod(0o700)  # it holds pickles of configs
        dependency = [d for h in after for d in h.dependency]
        jobs: list[Any] = []
        if len(calls) == 1:
            ex = self._executor(cfg, name, resources, dependency, None, spec.after_any)
            jobs.append(ex.submit(calls[0].fn, *calls[0].args))
            if on_submit:
                on_submit([0], [str(jobs[0].job_id)])
        else:
            for part in chunks(len(calls), max_array_size()):
                ex = self._executor(
                    cfg, name, resources, dependency, cfg.array_parallelism, spec.after_any
                )
                with ex.batch():
                    new = [ex.submit(calls[i].fn, *calls[i].args) for i in part]
                jobs += new
                if on_submit:  # record each array as soon as it exists
                    on_submit(list(part), [str(j.job_id) for j in new])
        ids = [str(j.job_id) for j in jobs]
        return SlurmHandle(self.layout, ids, [c.label for c in calls], jobs)

    def attach(self, job_ids: Sequence[str], labels: Sequence[str]) -> Handle:
        return SlurmHandle(self.layout, job_ids, labels)

    def live(self, job_ids: Sequence[str]) -> set[str]:
        return live_jobs(job_ids)

    def states(self, job_ids: Sequence[str]) -> dict[str, str] | None:
        got = job_states(job_ids)
        return None if got is None else {i: got.get(i, "UNKNOWN") for i in job_ids if i}


__all__ = ["DependencyFailed", "SlurmBackend", "SlurmHandle"]
