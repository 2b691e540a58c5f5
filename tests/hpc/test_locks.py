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


def test_busy_names_the_holder_in_words(tmp_path: Path) -> None:
    from hpc.locks import holder_text

    assert holder_text({"pid": 12, "host": "n1", "job_id": "7_3", "restart_count": 1}) == (
        "pid 12 on n1 (job 7_3, restart 1)"
    )
    assert holder_text({"pid": 12, "host": "n1"}) == "pid 12 on n1"
    assert holder_text("garbled") == "garbled"
    with FileLock(tmp_path / "x.lock", {"job_id": "9"}), pytest.raises(Busy) as e:
        FileLock(tmp_path / "x.lock").acquire()
    assert str(e.value).startswith(f"{tmp_path / 'x.lock'} is held by {{")


def test_a_live_holder_on_another_host_keeps_its_lock_until_its_heartbeat_is_stale(
    tmp_path: Path,
) -> None:
    """The fallback cannot see another host's processes: only the heartbeat (the file's mtime,
    moved by refresh()) tells a live holder from a dead one."""
    holder = FileLock(tmp_path / "x.lock", use_flock=False, stale_s=60).acquire()
    holder.excl_path.write_text(json.dumps({"host": "other-node", "pid": 1}))
    old = holder.excl_path.stat().st_mtime - 120
    os.utime(holder.excl_path, (old, old))  # two minutes without a heartbeat
    holder.refresh()  # the holder is alive after all: its heartbeat moves the mtime
    assert holder.excl_path.stat().st_mtime > old + 100
    with pytest.raises(Busy):
        FileLock(tmp_path / "x.lock", use_flock=False, stale_s=60).acquire()
    os.utime(holder.excl_path, (old, old))  # now it really stopped beating
    taker = FileLock(tmp_path / "x.lock", use_flock=False, stale_s=60).acquire()
    assert json.loads(taker.excl_path.read_text())["pid"] == os.getpid()
    taker.release()


def test_a_lock_in_a_folder_that_does_not_exist_yet(tmp_path: Path) -> None:
    lock = FileLock(tmp_path / "a" / "b" / "x.lock").acquire()
    assert lock.kind == "flock"
    lock.release()
