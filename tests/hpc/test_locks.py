"""hpc.locks: flock, and the O_EXCL fallback where a file system has none (Lustre, no flock)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
from pathlib import Path

import pytest

from hpc import runs
from hpc.errors import RunLockedError
from hpc.locks import Busy, FileLock


@pytest.mark.parametrize("use_flock", [True, False])
def test_a_held_lock_is_busy_and_names_its_holder(tmp_path: Path, use_flock: bool) -> None:
    path = tmp_path / "x.lock"
    with FileLock(path, {"job_id": "7_3"}, use_flock=use_flock):
        with pytest.raises(Busy) as e:
            FileLock(path, use_flock=use_flock).acquire()
        assert isinstance(e.value.holder, dict) and e.value.holder["job_id"] == "7_3"
    FileLock(path, use_flock=use_flock).acquire().release()  # released: free again


def test_enosys_from_flock_falls_back_to_an_exclusive_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_flock(fd: int, op: int) -> None:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    lock = FileLock(tmp_path / "x.lock").acquire()
    assert lock.kind == "O_EXCL file" and lock.excl_path.exists()
    first = runs.run_lock(tmp_path)
    first.__enter__()
    with pytest.raises(RunLockedError, match="locked by another"), runs.run_lock(tmp_path):
        pass
    first.__exit__(None, None, None)
    lock.release()
    assert not lock.excl_path.exists()


def test_a_stale_exclusive_file_of_a_dead_local_process_is_taken_over(tmp_path: Path) -> None:
    lock = FileLock(tmp_path / "x.lock", use_flock=False)
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)  # a pid that is surely gone
    lock.excl_path.write_text(json.dumps({"host": os.uname().nodename, "pid": pid}))
    lock.acquire()
    assert json.loads(lock.excl_path.read_text())["pid"] == os.getpid()
    lock.release()
