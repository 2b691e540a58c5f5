"""pytest plugin: a real, private Slurm cluster for tests marked ``slurm``.

Load it from ``tests/conftest.py`` with ``pytest_plugins = ["tests.slurm_cluster"]``.

The session-scoped fixture ``slurm_cluster`` runs ``hpc/devcluster/up.sh`` (state
in ``/tmp/cothpc-slurm``, or ``$COT_HPC_SLURM_STATE``), exports ``SLURM_CONF``
into ``os.environ`` and, at the end of the session, runs ``down.sh`` unless
``COT_HPC_KEEP_SLURM=1``.  It skips only when not root or not on Debian/apt.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
DEVCLUSTER = REPO_ROOT / "hpc" / "devcluster"
DEFAULT_STATE_DIR = "/tmp/cothpc-slurm"
DEFAULT_MAX_ARRAY_SIZE = 1001
_SCRIPT_TIMEOUT_S = 600  # up.sh may have to apt-get install the packages first


def _run_script(name: str, *args: str) -> str:
    cmd = ["bash", str(DEVCLUSTER / name), *args]
    t0 = time.monotonic()
    proc = subprocess.run(
        cmd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=_SCRIPT_TIMEOUT_S,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed (rc={proc.returncode}, {time.monotonic() - t0:.1f}s)\n"
            f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        )
    return proc.stdout.strip()


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "no slurm: not root (the dev cluster needs root)"
    if not Path("/etc/debian_version").exists() or shutil.which("apt-get") is None:
        return "no slurm: not Debian/apt (the dev cluster installs Debian's slurm-wlm)"
    return None


@dataclass
class SlurmCluster:
    """Handle on the running dev cluster."""

    state_dir: Path
    max_array_size: int = DEFAULT_MAX_ARRAY_SIZE
    last_output: str = field(default="", repr=False)

    @property
    def conf(self) -> Path:
        return self.state_dir / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """Variables to merge into os.environ (or a subprocess env)."""
        return {"SLURM_CONF": str(self.conf)}

    def up(self) -> str:
        self.last_output = _run_script(
            "up.sh", str(self.state_dir), "--max-array-size", str(self.max_array_size)
        )
        return self.last_output

    def down(self) -> str:
        self.last_output = _run_script("down.sh", str(self.state_dir))
        return self.last_output

    def reconfigure(self, max_array_size: int) -> None:
        """Set MaxArraySize (rewrites slurm.conf, restarts slurmctld and slurmd)."""
        previous = self.max_array_size
        self.max_array_size = int(max_array_size)
        try:
            self.up()
        except Exception:
            self.max_array_size = previous
            raise

    @contextlib.contextmanager
    def max_array_size_set(self, max_array_size: int) -> Iterator[SlurmCluster]:
        """Temporarily set MaxArraySize; the previous value is restored on exit."""
        previous = self.max_array_size
        self.reconfigure(max_array_size)
        try:
            yield self
        finally:
            if self.max_array_size != previous:
                self.reconfigure(previous)

    @staticmethod
    def counting_sbatch(folder: Path) -> Path:
        """Write ``folder/sbatch``: the real sbatch, which first appends ``sbatch ARGS`` to
        ``$COT_TEST_SBATCH_LOG`` when that is set. Put ``folder`` first on PATH to count calls."""
        real = shutil.which("sbatch")
        assert real, "sbatch not on PATH"
        folder.mkdir(parents=True, exist_ok=True)
        wrapper = folder / "sbatch"
        wrapper.write_text(
            "#!/bin/sh\n"
            '[ -n "$COT_TEST_SBATCH_LOG" ] && echo "sbatch $*" >> "$COT_TEST_SBATCH_LOG"\n'
            f'exec {real} "$@"\n'
        )
        wrapper.chmod(0o755)
        return wrapper

    def restart_controller(self) -> None:
        """Stop and restart slurmctld only; its state is kept."""
        self.last_output = _run_script("restart-controller.sh", str(self.state_dir))


def line_count(path: Path) -> int:
    """Newline-terminated lines in ``path``; 0 when it does not exist yet."""
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    reason = _skip_reason()
    if reason is not None:
        pytest.skip(reason)  # only where this is not root or has no slurm (not Debian/apt)
    cluster = SlurmCluster(state_dir=Path(os.environ.get("COT_HPC_SLURM_STATE", DEFAULT_STATE_DIR)))
    from cot.training import scoped_environ

    cluster.up()
    # up.sh resolves symlinks; use the same path so SLURM_CONF matches the jobs'.
    cluster.state_dir = cluster.state_dir.resolve()
    try:
        with scoped_environ(cluster.env):
            yield cluster
    finally:
        if os.environ.get("COT_HPC_KEEP_SLURM") != "1":
            cluster.down()
