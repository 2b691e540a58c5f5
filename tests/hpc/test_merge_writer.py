"""The fast merge's writer thread: its memory bound, its errors and its write-back hints."""

from __future__ import annotations

import errno
import io
import os
import threading
import time
from pathlib import Path

import pytest

from hpc.shards import _BlockWriter


def _in_thread(fn: object, *args: object) -> threading.Thread:
    t = threading.Thread(target=fn, args=args, daemon=True)  # type: ignore[arg-type]
    t.start()
    return t


def test_at_most_two_blocks_wait_while_the_disk_is_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader runs ahead of a slow disk by two blocks (memory stays bounded), no more."""
    monkeypatch.delattr(os, "posix_fadvise", raising=False)
    busy, release = threading.Event(), threading.Event()

    class SlowDisk(io.BytesIO):
        def write(self, b: object) -> int:
            busy.set()
            release.wait(10)
            return super().write(b)  # type: ignore[arg-type]

    out = SlowDisk()
    writer = _BlockWriter(out)
    try:
        writer.write(memoryview(b"a"))
        assert busy.wait(10)  # the thread holds "a" in write()
        # a stack dump of a hung merge names the thread; a crashed one never waits on it at exit
        (thread,) = [t for t in threading.enumerate() if t.name == "merge-writer"]
        assert thread.daemon
        writer.write(memoryview(b"b"))
        writer.write(memoryview(b"c"))  # the queue is full
        third = _in_thread(writer.write, memoryview(b"d"))
        third.join(0.3)
        assert third.is_alive()  # waits for the disk
        release.set()
        third.join(10)
        assert not third.is_alive()
        assert writer.close() is None
        assert out.getvalue() == b"abcd" and not thread.is_alive()
    finally:  # a failed check must not leave the writer waiting on the disk
        release.set()


def test_a_failed_write_is_raised_to_the_reader_and_never_hangs_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delattr(os, "posix_fadvise", raising=False)
    full = OSError(errno.ENOSPC, "No space left on device")

    class FullDisk(io.BytesIO):
        def write(self, b: object) -> int:
            if self.tell() >= 2:
                # fail once the reader has filled the queue and waits on it: the writer must
                # keep draining after its error, or the reader (and close()) wait forever
                for _ in range(200):
                    if writer._queue.full():
                        break
                    time.sleep(0.01)
                raise full
            return super().write(b)  # type: ignore[arg-type]

    out = FullDisk()
    writer = _BlockWriter(out)
    raised: list[BaseException] = []
    closed: list[BaseException | None] = []

    def reader() -> None:
        try:
            for i in range(50):
                writer.write(memoryview(b"%02d" % i))
        except OSError as err:
            raised.append(err)
        closed.append(writer.close())

    t = _in_thread(reader)
    t.join(10)
    assert not t.is_alive(), "the reader hung on a writer that stopped draining"
    assert closed == [full]  # close() hands over the first error
    assert raised == [full]  # a later write() raises it
    assert out.getvalue() == b"00"  # nothing written after the failure


def test_each_block_is_flushed_then_handed_to_write_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """POSIX_FADV_DONTNEED over exactly the bytes of each block, once they are in the file
    (flushed from Python's buffer: advice on pages not yet written does nothing)."""
    calls: list[tuple[int, int, int]] = []

    def fadvise(fd: int, offset: int, size: int, advice: int) -> None:
        assert os.fstat(fd).st_size >= offset + size  # flushed first
        calls.append((offset, size, advice))

    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    with open(tmp_path / "merged", "wb") as out:
        writer = _BlockWriter(out)
        for block in (b"abc", b"defgh", b"ijklmnp"):
            writer.write(memoryview(block))
        assert writer.close() is None
    dontneed = os.POSIX_FADV_DONTNEED
    assert calls == [(0, 3, dontneed), (3, 5, dontneed), (8, 7, dontneed)]
    assert (tmp_path / "merged").read_bytes() == b"abcdefghijklmnp"
