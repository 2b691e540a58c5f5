"""hpc.distributed: rendezvous ports, rank environments and the preemption flag (no cluster)."""

from __future__ import annotations

import itertools
import os
import signal
from typing import Any

import pytest

from hpc import distributed as D


def test_port_is_deterministic_and_in_range() -> None:
    p = D.rendezvous_port("4711", 0)
    assert p == D.rendezvous_port("4711", 0)
    assert D.PORT_LO <= p < D.PORT_HI
    assert all(D.PORT_LO <= D.rendezvous_port(str(j), a) < D.PORT_HI
               for j in range(50) for a in range(20))  # fmt: skip
    with pytest.raises(ValueError):
        D.rendezvous_port("1", -1)


def test_every_restart_gets_a_fresh_port() -> None:
    ports = [D.rendezvous_port("123456", a) for a in range(1000)]
    assert len(set(ports)) == 1000  # no attempt reuses an earlier attempt's port
    assert all(a != b for a, b in itertools.pairwise(ports))
    # Different jobs start at different places.
    firsts = {D.rendezvous_port(str(j), 0) for j in range(1000, 1100)}
    assert len(firsts) > 95


def test_attempt_counts_slurm_restarts_and_checkpoint_requeues() -> None:
    assert D.restart_count({}) == 0
    assert D.restart_count({"SLURM_RESTART_COUNT": "2"}) == 2
    assert D.restart_count({"SLURM_RESTART_COUNT": ""}) == 0
    # SLURM: checkpoint requeue (both move), bare requeue (only SLURM moves), checkpoint again.
    seq = [
        D.attempt_number({"SLURM_RESTART_COUNT": str(r)}, q)
        for r, q in ((0, 0), (1, 1), (2, 1), (3, 2))
    ]
    assert seq == sorted(set(seq))  # strictly increasing: a new port every time
    # The local backend has no SLURM_RESTART_COUNT: the callable's own counter moves it.
    assert [D.attempt_number({}, q) for q in range(3)] == [0, 1, 2]


def test_rank_env_multi_node_uses_first_host_of_allocation() -> None:
    env = D.rank_env(
        job_id="77",
        global_rank=3,
        local_rank=1,
        num_tasks=4,
        num_nodes=2,
        node=1,
        hostnames=["n1", "n2"],
        attempt=1,
    )
    assert env.master_addr == "n1"
    assert env.master_port == D.rendezvous_port("77", 1)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 4, 1, 2)
    assert not env.is_main
    v = env.as_env()
    assert v["RANK"] == "3" and v["WORLD_SIZE"] == "4" and v["LOCAL_RANK"] == "1"
    assert v["LOCAL_WORLD_SIZE"] == "2" and v["NODE_RANK"] == "1" and v["MASTER_ADDR"] == "n1"


def test_rank_env_single_node_uses_loopback_and_rejects_bad_shapes() -> None:
    one = D.rank_env(
        job_id="9", global_rank=0, local_rank=0, num_tasks=2, num_nodes=1, node=0,
        hostnames=["somehost"], attempt=0,
    )  # fmt: skip
    assert one.master_addr == "127.0.0.1" and one.is_main and one.local_world_size == 2
    for bad in (
        {"global_rank": 2, "num_tasks": 2, "num_nodes": 1},
        {"global_rank": 0, "num_tasks": 3, "num_nodes": 2},
        {"global_rank": 0, "num_tasks": 0, "num_nodes": 1},
    ):
        with pytest.raises(ValueError):
            D.rank_env(job_id="1", local_rank=0, node=0, hostnames=[], attempt=0, **bad)


def test_from_submitit_outside_a_job_is_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    env = D.from_submitit(requeues=2, environ={"SLURM_RESTART_COUNT": "1"})
    assert env.world_size == 1 and env.rank == 0 and env.attempt == 3


def test_from_submitit_reads_the_local_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in {
        "SUBMITIT_EXECUTOR": "local",
        "SUBMITIT_LOCAL_JOB_ID": "555",
        "SUBMITIT_LOCAL_NTASKS": "2",
        "SUBMITIT_LOCAL_JOB_NUM_NODES": "1",
        "SUBMITIT_LOCAL_NODEID": "0",
        "SUBMITIT_LOCAL_GLOBALID": "1",
        "SUBMITIT_LOCAL_LOCALID": "1",
    }.items():
        monkeypatch.setenv(k, v)
    env = D.from_submitit(requeues=1, environ={})
    assert (env.rank, env.world_size, env.local_rank, env.job_id) == (1, 2, 1, "555")
    assert env.master_port == D.rendezvous_port("555", 1)
    target: dict[str, str] = {"MASTER_PORT": "1"}  # a stale value from an earlier attempt
    D.export(env, target)
    assert target["MASTER_PORT"] == str(env.master_port) and target["RANK"] == "1"


@pytest.fixture
def restore_usr2() -> Any:
    previous = signal.getsignal(signal.SIGUSR2)
    yield
    signal.signal(signal.SIGUSR2, previous)


def test_signal_only_sets_the_flag(restore_usr2: Any) -> None:
    calls: list[int] = []
    signal.signal(signal.SIGUSR2, lambda s, f: calls.append(s))  # stands in for submitit's
    flag = D.PreemptionFlag().install()
    assert not flag()
    os.kill(os.getpid(), signal.SIGUSR2)
    assert flag() and flag.signum == signal.SIGUSR2
    assert calls == []  # submitit's handler was NOT run by the signal itself


def test_rank0_hands_over_to_submitit_then_all_ranks_exit(restore_usr2: Any) -> None:
    events: list[str] = []

    def submitit_handler(signum: int, frame: Any) -> None:
        events.append("requeue")
        raise SystemExit(144)  # what the local backend's requeue does

    signal.signal(signal.SIGUSR2, submitit_handler)
    flag = D.PreemptionFlag().install()
    with pytest.raises(SystemExit) as rank0:
        flag.requeue_and_exit(0, barrier=lambda: events.append("barrier"))
    assert rank0.value.code == 144 and events == ["requeue", "barrier"]
    events.clear()
    with pytest.raises(SystemExit) as rank1:
        flag.requeue_and_exit(1, barrier=lambda: events.append("barrier"))
    assert rank1.value.code == -1 and events == ["barrier"]  # only rank 0 requeues


def test_launcher_environment_is_kept_outside_submitit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    launched = {
        "RANK": "1",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "node7",
        "MASTER_PORT": "29500",
    }
    env = D.from_submitit(environ=launched)  # torchrun / accelerate launch exported these
    assert (env.rank, env.world_size, env.local_rank, env.num_nodes) == (1, 4, 1, 2)
    assert (env.master_addr, env.master_port) == ("node7", 29500)
    assert D.from_launcher({"RANK": "0", "WORLD_SIZE": "2"}) is None  # no rendezvous address
