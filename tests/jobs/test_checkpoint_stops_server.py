"""submitit's USR2 handler calls ``checkpoint()`` and then requeues: a shard task's inference
server must be gone when ``checkpoint()`` returns, not left for Slurm's kill."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from cot.serving import Server, _group_members, free_port
from jobs.evaluate import EvaluateShard
from jobs.generate import GenerateShard


@pytest.mark.parametrize("callable_", [GenerateShard, EvaluateShard])
def test_checkpoint_stops_the_server_first(tmp_path: Path, callable_: type) -> None:
    # A server that forks a worker into its group, as vLLM does.
    sleep = "import time; time.sleep(600)"
    fork = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {sleep!r}])"
    code = f"{fork}; {sleep}"
    server = Server([sys.executable, "-c", code], port=free_port(), log_path=tmp_path / "s.log")
    server.start()
    try:
        pid = server.pid
        assert pid is not None
        os.getpgid(pid)
        delayed = callable_().checkpoint("cfg", 3)
        assert _group_members(pid) == []  # leader and worker gone before the requeue
        assert not server.alive()
        assert delayed.args == ("cfg", 3)
    finally:
        server.stop()
