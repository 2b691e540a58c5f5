"""The sbatch scripts the SLURM backend sends, captured by a fake ``sbatch`` on PATH.

Fast: no cluster. Each test submits through :class:`hpc.backends.slurm.SlurmBackend` exactly as
a stage does, and asserts on the ``#SBATCH`` lines submitit wrote.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpc.backends import Call, Resources
from hpc.backends import slurm as E
from hpc.backends.slurm import SlurmBackend
from hpc.config import ClusterFields
from hpc.errors import ConfigError
from hpc.layout import RunLayout


def _noop(*args: object) -> None:
    return None


@pytest.fixture()
def fake_sbatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """PATH has an ``sbatch`` that saves each script under ``scripts/`` and prints an id, and
    an ``scontrol`` that reports ``MaxArraySize = 4``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    counter = tmp_path / "n"
    counter.write_text("100")
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(
        "#!/bin/sh\n"
        f"n=$(cat {counter}); n=$((n+1)); echo $n > {counter}\n"
        f'cp "$1" {scripts}/$n.sh\n'
        'echo "Submitted batch job $n"\n'
    )
    scontrol = bin_dir / "scontrol"
    scontrol.write_text("#!/bin/sh\nprintf 'MaxArraySize            = 4\\n'\n")
    for p in (sbatch, scontrol):
        p.chmod(p.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    E.max_array_size.cache_clear()
    yield scripts
    E.max_array_size.cache_clear()


def _scripts(folder: Path) -> list[list[str]]:
    return [
        [ln for ln in p.read_text().splitlines() if ln.startswith("#SBATCH")]
        for p in sorted(folder.glob("*.sh"), key=lambda p: int(p.stem))
    ]


def _tasks(script: list[str]) -> int:
    for ln in script:
        if m := re.fullmatch(r"#SBATCH --array=0-(\d+)%\d+", ln):
            return int(m.group(1)) + 1
    return 1


def _submit(tmp_path: Path, n: int, **cluster: object) -> tuple[SlurmBackend, list[str]]:
    backend = SlurmBackend(RunLayout(tmp_path / "run"))
    cfg = ClusterFields(run_dir=str(tmp_path / "run"), **cluster)  # type: ignore[arg-type]
    calls = [Call(_noop, (i,), f"shard {i}") for i in range(n)]
    handle = backend.submit(calls, cfg=cfg, name="cot-generate run")
    return backend, handle.job_ids


@pytest.mark.parametrize(("k", "limit"), [(1, 1), (2, 2), (7, 3)])  # submitit caps K at N
def test_array_line_carries_parallelism(
    fake_sbatch: Path, tmp_path: Path, k: int, limit: int
) -> None:
    _submit(tmp_path, 3, array_parallelism=k)
    (script,) = _scripts(fake_sbatch)
    assert f"#SBATCH --array=0-2%{limit}" in script


def test_array_without_parallelism_runs_every_task_at_once(
    fake_sbatch: Path, tmp_path: Path
) -> None:
    _submit(tmp_path, 3)
    (script,) = _scripts(fake_sbatch)
    assert "#SBATCH --array=0-2%3" in script


@pytest.mark.parametrize(("n", "arrays"), [(4, 1), (5, 2), (8, 2), (9, 3)])
def test_one_array_per_max_array_size(
    fake_sbatch: Path, tmp_path: Path, n: int, arrays: int
) -> None:
    _, ids = _submit(tmp_path, n)
    scripts = _scripts(fake_sbatch)
    assert len(scripts) == arrays == -(-n // 4)
    # A chunk of one call is a plain job (submitit submits a batch of one without --array).
    sizes = [_tasks(s) for s in scripts]
    assert sum(sizes) == n and all(size <= 4 for size in sizes)
    assert len(ids) == n and len({i.split("_")[0] for i in ids}) == arrays


def test_signal_time_requeue_and_dependency_lines(fake_sbatch: Path, tmp_path: Path) -> None:
    backend = SlurmBackend(RunLayout(tmp_path / "run"))
    cfg = ClusterFields(
        run_dir=str(tmp_path / "run"), time_min=60, signal_delay_s=120, partition="gpu"
    )
    first = backend.submit([Call(_noop, (), "a"), Call(_noop, (), "b")], cfg=cfg, name="x")
    backend.submit([Call(_noop, (), "merge")], cfg=cfg, name="x", after=[first])
    array, merge = _scripts(fake_sbatch)
    for script in (array, merge):
        assert "#SBATCH --signal=USR2@120" in script
        assert "#SBATCH --time=60" in script
        assert "#SBATCH --partition=gpu" in script
        assert "#SBATCH --open-mode=append" in script  # requeued attempts append to the log
    root = first.job_ids[0].split("_")[0]
    assert f"#SBATCH --dependency=afterok:{root}" in merge
    assert "#SBATCH --kill-on-invalid-dep=yes" in merge
    assert not any("dependency" in ln for ln in array)


def test_after_any_depends_on_the_end_of_the_tasks_not_their_success(
    fake_sbatch: Path, tmp_path: Path
) -> None:
    backend = SlurmBackend(RunLayout(tmp_path / "run"))
    cfg = ClusterFields(run_dir=str(tmp_path / "run"), time_min=60)
    first = backend.submit([Call(_noop, (), "a"), Call(_noop, (), "b")], cfg=cfg, name="x")
    backend.submit([Call(_noop, (), "merge")], cfg=cfg, name="x", after=[first], after_any=True)
    _, merge = _scripts(fake_sbatch)
    assert f"#SBATCH --dependency=afterany:{first.job_ids[0].split('_')[0]}" in merge


def test_multi_node_shape(fake_sbatch: Path, tmp_path: Path) -> None:
    backend = SlurmBackend(RunLayout(tmp_path / "run"))
    cfg = ClusterFields(run_dir=str(tmp_path / "run"))
    res = Resources(nodes=2, tasks_per_node=4, gpus_per_node=4)
    backend.submit([Call(_noop, (), "train")], cfg=cfg, name="x", resources=res)
    (script,) = _scripts(fake_sbatch)
    assert "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=4" in script
    assert "#SBATCH --gpus-per-node=4" in script


@pytest.mark.parametrize("bad", ["run\nx", "run\rx", "run\x00x"])
def test_newline_in_job_name_never_reaches_sbatch(
    fake_sbatch: Path, tmp_path: Path, bad: str
) -> None:
    backend = SlurmBackend(RunLayout(tmp_path / "run"))
    with pytest.raises(ConfigError, match="newline"):
        backend.submit(
            [Call(_noop, (), "a")], cfg=ClusterFields(run_dir=str(tmp_path)), name=f"cot-x {bad}"
        )
    assert _scripts(fake_sbatch) == []
