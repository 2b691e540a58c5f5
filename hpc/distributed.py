"""The rank environment of one multi-process job, and the preemption flag its ranks agree on.

Every process of a training job runs the same callable. Its rank, world size and local rank come
from ``submitit.JobEnvironment()``: SLURM variables on a cluster, ``SUBMITIT_LOCAL_*`` on the local
backend. The rendezvous address is the first node of the allocation, and the port is derived from
the job id and the attempt number, so every start and every restart gets a fresh port and never
meets a stale store left by the previous attempt.

The preemption signal (USR2, which submitit uses) only sets a flag here. The ranks agree on it at
a step boundary, save together, and only then does rank 0 hand over to submitit's own handler,
which calls ``checkpoint()``, requeues and keeps the ``max_num_timeout`` accounting.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

# Below Linux's ephemeral range (32768-60999 by default): a port picked there can already be
# the local end of an outgoing connection (sacct, an HTTP client), and the bind fails.
PORT_LO = 20000
PORT_HI = 32768
# A prime that does not divide the span: consecutive attempts walk through all 40000 ports
# before any repeats, so attempt k+1 never lands on attempt k's port.
PORT_STRIDE = 7919


def rendezvous_port(job_id: str, attempt: int, lo: int = PORT_LO, hi: int = PORT_HI) -> int:
    """The rendezvous port of one attempt of a job: a pure function of (job id, attempt).

    Every rank computes the same value without talking to the others, and two consecutive
    attempts of one job always differ.

    Args:
        job_id: the scheduler's job id (``SLURM_JOB_ID``, or the local controller's pid).
        attempt: 0 for the first start, then one more per restart.
        lo: lowest port (inclusive).
        hi: highest port (exclusive).
    """
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, got {attempt}")
    span = hi - lo
    base = int(hashlib.sha256(str(job_id).encode()).hexdigest()[:12], 16)
    return lo + (base + attempt * PORT_STRIDE) % span


def restart_count(environ: Mapping[str, str]) -> int:
    """How many times SLURM restarted this job (``SLURM_RESTART_COUNT``; 0 when unset)."""
    raw = environ.get("SLURM_RESTART_COUNT", "").strip()
    return int(raw) if raw.isdigit() else 0


def attempt_number(environ: Mapping[str, str], requeues: int) -> int:
    """The attempt index: SLURM restarts plus checkpoint-requeues counted by the callable.

    SLURM counts every requeue (checkpoint or bare ``scontrol requeue``); the local backend
    counts none, so the callable's own counter, bumped in ``checkpoint()``, covers it. The sum
    grows by at least one at every restart on both backends.
    """
    return restart_count(environ) + max(0, requeues)


@dataclass(frozen=True)
class RankEnv:
    """Where one process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    master_addr: str
    master_port: int
    job_id: str
    attempt: int

    @property
    def is_main(self) -> bool:
        """True on global rank 0."""
        return self.rank == 0

    def as_env(self) -> dict[str, str]:
        """The variables torch.distributed (env://), accelerate and DeepSpeed read."""
        return {
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "NODE_RANK": str(self.node_rank),
            "GROUP_RANK": str(self.node_rank),
        }


def rank_env(
    *,
    job_id: str,
    global_rank: int,
    local_rank: int,
    num_tasks: int,
    num_nodes: int,
    node: int,
    hostnames: Sequence[str],
    attempt: int,
) -> RankEnv:
    """Build the rank environment from scheduler facts (pure; unit-tested).

    The master is the first host of the allocation. A one-node job rendezvouses on loopback,
    which needs no name resolution at all.
    """
    if num_tasks < 1 or num_nodes < 1:
        raise ValueError(f"bad job shape: {num_tasks} tasks on {num_nodes} nodes")
    if not 0 <= global_rank < num_tasks:
        raise ValueError(f"rank {global_rank} outside world size {num_tasks}")
    if num_tasks % num_nodes:
        raise ValueError(f"{num_tasks} tasks do not split evenly over {num_nodes} nodes")
    master = "127.0.0.1" if num_nodes == 1 or not hostnames else hostnames[0]
    return RankEnv(
        rank=global_rank,
        world_size=num_tasks,
        local_rank=local_rank,
        local_world_size=num_tasks // num_nodes,
        node_rank=node,
        num_nodes=num_nodes,
        master_addr=master,
        master_port=rendezvous_port(job_id, attempt),
        job_id=str(job_id),
        attempt=attempt,
    )


def from_launcher(environ: Mapping[str, str]) -> RankEnv | None:
    """The rank environment torchrun or ``accelerate launch`` already exported, if any."""
    needed = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    if not all(environ.get(k, "").strip() for k in needed):
        return None
    world = int(environ["WORLD_SIZE"])
    local_world = int(environ.get("LOCAL_WORLD_SIZE", world))
    return RankEnv(
        rank=int(environ["RANK"]),
        world_size=world,
        local_rank=int(environ.get("LOCAL_RANK", "0")),
        local_world_size=local_world,
        node_rank=int(environ.get("NODE_RANK", environ.get("GROUP_RANK", "0"))),
        num_nodes=max(1, world // max(1, local_world)),
        master_addr=environ["MASTER_ADDR"],
        master_port=int(environ["MASTER_PORT"]),
        job_id=environ.get("TORCHELASTIC_RUN_ID", "launcher"),
        attempt=int(environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0),
    )


def from_submitit(requeues: int = 0, environ: Mapping[str, str] | None = None) -> RankEnv:
    """The rank environment of the running submitit job.

    Outside a submitit job, the environment a launcher (torchrun, ``accelerate launch``)
    exported is kept as it is; with none, this is a single process.
    """
    environ = os.environ if environ is None else environ
    attempt = attempt_number(environ, requeues)
    try:
        import submitit

        env = submitit.JobEnvironment()
    except RuntimeError:
        launched = from_launcher(environ)
        if launched is not None:
            return launched
        return rank_env(
            job_id=str(os.getpid()),
            global_rank=0,
            local_rank=0,
            num_tasks=1,
            num_nodes=1,
            node=0,
            hostnames=[],
            attempt=attempt,
        )
    return rank_env(
        job_id=str(env.job_id),
        global_rank=env.global_rank,
        local_rank=env.local_rank,
        num_tasks=env.num_tasks,
        num_nodes=env.num_nodes,
        node=env.node,
        hostnames=list(env.hostnames),
        attempt=attempt,
    )


def export(env: RankEnv, environ: MutableMapping[str, str] | None = None) -> None:
    """Write the rank variables into the environment, replacing any left by an earlier attempt."""
    target = os.environ if environ is None else environ
    target.update(env.as_env())


# --------------------------------------------------------------------------- preemption


Handler = Callable[[int, FrameType | None], Any]


def ignore_late_signals() -> None:
    """Ignore the preemption signal for the rest of a job whose work is on disk.

    Call it once the task's completion marker is written. A preemption then has nothing left
    to save, yet a USR2 would still end the task badly: while the interpreter shuts down Python
    puts its handlers back to the default, and the default action of USR2 is to die, which Slurm
    records as FAILED for a task whose output is complete. Ignored signals stay ignored through
    the shutdown. Only in a submitit job's main thread (never in a test's or launcher's process).
    """
    if "SUBMITIT_FOLDER" not in os.environ:
        return
    if threading.current_thread() is not threading.main_thread():
        return
    try:
        from submitit.core.job_environment import JobEnvironment

        sig = int(JobEnvironment._usr_sig())
    except (ImportError, RuntimeError):
        sig = int(signal.SIGUSR2)
    signal.signal(sig, signal.SIG_IGN)


class PreemptionFlag:
    """USR2 sets a flag; the training loop decides when to act on it.

    submitit installs ``SignalHandler.checkpoint_and_try_requeue`` for USR2 before the callable
    starts. That handler requeues and exits at once, in the middle of whatever a rank is doing,
    and only on rank 0. :meth:`install` keeps it aside and puts a flag-setter in its place;
    :meth:`requeue_and_exit` calls it later, once every rank has saved.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous: Any = None
        self._sig: int | None = None

    def install(self) -> PreemptionFlag:
        """Replace the preemption signal's handler (submitit's, or the default) with the flag."""
        try:
            from submitit.core.job_environment import JobEnvironment

            self._sig = int(JobEnvironment._usr_sig())
        except (ImportError, RuntimeError):
            self._sig = int(signal.SIGUSR2)
        self._previous = signal.getsignal(self._sig)
        signal.signal(self._sig, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: saving here would race the rank's own collectives.
        self.requested = True
        self.signum = signum
        log.info(f"signal {signal.Signals(signum).name}: checkpoint at the next step")

    def __call__(self) -> bool:
        """True once the signal has arrived on this rank."""
        return self.requested

    def requeue_and_exit(self, rank: int, barrier: Callable[[], None] | None = None) -> None:
        """After the collective save: rank 0 requeues through submitit, then every rank exits.

        submitit's handler checks for a timeout (and counts it against ``max_num_timeout``),
        calls ``checkpoint()`` (which returns the same callable), dumps it, requeues the job
        (``scontrol requeue`` on SLURM, exit code 144 on the local backend) and exits. The
        ranks meet at ``barrier`` once that is done, so no rank's exit can cut the requeue
        short (``srun --kill-on-bad-exit`` would), and they leave without a result file,
        exactly as submitit's own non-zero ranks do.
        """
        previous = self._previous
        try:
            if rank == 0 and callable(previous) and self._sig is not None:
                previous(self._sig, None)  # raises SystemExit (requeued) or UncompletedJobError
            elif rank == 0:
                log.info("preempted: checkpoint saved; not a submitit job, nothing to requeue")
        finally:
            if barrier is not None:
                barrier()
        sys.exit(-1)
