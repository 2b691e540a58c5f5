"""Nothing but `download` touches the network: the whole pipeline runs with networking blocked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

# Loaded into every Python process of the run (PYTHONPATH): refuses and records any connection
# that is not to this machine, so a hidden download fails loudly instead of hanging.
GUARD = r"""
import ipaddress, os, socket
_LOG = os.environ["COT_NET_GUARD_LOG"]
_real = socket.socket.connect
try:
    _own = {socket.gethostbyname(socket.gethostname())}
except OSError:
    _own = set()

def _local(addr):
    if not isinstance(addr, tuple):
        return True  # AF_UNIX
    host = addr[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or host in _own

def connect(self, addr):
    if not _local(addr):
        with open(_LOG, "a") as fh:
            fh.write(repr(addr) + "\n")
        raise OSError(101, "network blocked by cot-hpc test guard")
    return _real(self, addr)

socket.socket.connect = connect
"""


@pytest.mark.slow
def test_pipeline_runs_with_network_blocked(tiny_models: Path, tmp_path: Path) -> None:
    guard_dir = tmp_path / "guard"
    guard_dir.mkdir()
    (guard_dir / "sitecustomize.py").write_text(GUARD)
    log = tmp_path / "blocked.log"
    env = {
        **os.environ,
        "PYTHONPATH": f"{guard_dir}{os.pathsep}{REPO}",
        "COT_NET_GUARD_LOG": str(log),
        "HF_HUB_OFFLINE": "1",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "ALL_PROXY": "http://127.0.0.1:9",
    }
    run = tmp_path / "run"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "hpc.launch",
            "pipeline",
            "--cluster",
            "local",
            "--run-dir",
            str(run),
            "--set",
            "generate.num_samples=24",
            "--set",
            "train.max_steps=6",
            "--set",
            "evaluate.num_samples=16",
            "--set",
            "evaluate.compare_base=false",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (
        json.loads((run / "results" / "report.json").read_text())["student"]["overall"]["n"] == 16
    )
    assert not log.exists(), log.read_text()
    # The guard really is active in that environment: a non-local connection is refused.
    probe = subprocess.run(
        [sys.executable, "-c", "import socket; socket.create_connection(('192.0.2.1', 443), 2)"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert probe.returncode != 0 and "network blocked" in probe.stderr


def test_download_refuses_when_offline(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from hpc.launch import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["download", "--teacher", "org/teacher"]) == 2
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert main(["download"]) == 2
    assert "give --teacher" in capsys.readouterr().err
