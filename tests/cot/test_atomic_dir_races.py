"""``atomic_dir``'s placement on a file system without ``renameat2`` (older Lustre, NFS): each
race another writer can win between two of its renames, staged one at a time.

Every test drives ``records._place`` with a scripted ``os.replace``: before the n-th rename
it lets "another writer" act (move ``dest`` away, land its own folder) or fails the rename.
"""

from __future__ import annotations

import errno
import os
import shutil
import types
from collections.abc import Callable
from pathlib import Path

import pytest

from cot import records


def _folder(path: Path, content: str) -> Path:
    path.mkdir(parents=True)
    (path / "w.bin").write_text(content)
    return path


def _content(path: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in path.iterdir()}


class _Renames:
    """``os.replace`` for ``records``: logs each call as (src name, dest name) and runs
    ``before[n]`` ahead of the n-th (which may raise in its place)."""

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, before: dict[int, Callable[[], None]]
    ) -> None:
        self.calls: list[tuple[str, str]] = []
        fake_os = types.SimpleNamespace(**vars(os))
        fake_os.replace = self._replace
        self._before = before
        monkeypatch.setattr(records, "os", fake_os)
        monkeypatch.setattr(records, "exchange", lambda a, b: False)  # no renameat2 here

    def _replace(self, src: Path, dst: Path) -> None:
        self.calls.append((Path(src).name, Path(dst).name))
        if (act := self._before.get(len(self.calls))) is not None:
            act()
        os.replace(src, dst)


def _taken(root: Path) -> tuple[Path, Path]:
    """``root/adapter`` holding the old content, and ours to place over it."""
    return _folder(root / "adapter", "old"), _folder(root / ".adapter.tmp", "ours")


def _need_exchange(tmp_path: Path) -> None:
    """Skip unless this file system swaps two folders in one step (renameat2)."""
    if not records.exchange(_folder(tmp_path / "a", "a"), _folder(tmp_path / "b", "b")):
        pytest.skip("no renameat2(RENAME_EXCHANGE) on this file system")


def _side(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir())


def test_a_taken_dest_is_renamed_aside_then_ours_renamed_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest, tmp = _taken(tmp_path)
    renames = _Renames(monkeypatch, {})
    records._place(tmp, dest)
    assert _content(dest) == {"w.bin": "ours"} and _side(tmp_path) == ["adapter"]
    (_, _), (_, old), (_, _) = renames.calls
    assert renames.calls == [
        (".adapter.tmp", "adapter"),
        ("adapter", old),
        (".adapter.tmp", "adapter"),
    ]
    assert old.startswith(".adapter.") and old.endswith(".old")


def test_dest_moved_away_by_another_writer_before_ours_moves_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other writer renamed ``dest`` aside first: ours finds it gone, drops its empty
    aside folder, and renames straight in."""
    root = tmp_path / "x"
    dest, tmp = _taken(root)
    elsewhere = tmp_path / "theirs-aside"
    renames = _Renames(monkeypatch, {2: lambda: os.replace(dest, elsewhere)})
    records._place(tmp, dest)
    assert _content(dest) == {"w.bin": "ours"}
    assert _side(root) == ["adapter"]  # no empty ".old" folder left behind
    assert len(renames.calls) == 3 and renames.calls[2] == (".adapter.tmp", "adapter")


def test_another_writers_folder_landing_in_the_gap_is_replaced_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between ours moving the old folder aside and renaming in, another whole folder lands:
    ours goes round again and replaces it; neither old folder is left beside ``dest``."""
    dest, tmp = _taken(tmp_path)
    renames = _Renames(monkeypatch, {3: lambda: _folder(dest, "theirs") and None})
    records._place(tmp, dest)
    assert _content(dest) == {"w.bin": "ours"} and _side(tmp_path) == ["adapter"]
    assert [c[1] == "adapter" for c in renames.calls] == [True, False, True, True, False, True]


def test_a_failed_rename_in_puts_the_old_folder_back_and_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest, tmp = _taken(tmp_path)

    def cross_device() -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    _Renames(monkeypatch, {3: cross_device})
    with pytest.raises(OSError) as err:
        records._place(tmp, dest)
    assert err.value.errno == errno.EXDEV
    assert _content(dest) == {"w.bin": "old"}  # as it was
    assert _side(tmp_path) == [".adapter.tmp", "adapter"]  # atomic_dir removes its temp


def test_an_old_folder_that_cannot_go_back_is_kept_beside_never_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ours fails to rename in while another writer lands: the old folder cannot be put back
    over theirs, so it stays beside it, whole, and the first error is the one raised."""
    dest, tmp = _taken(tmp_path)

    def theirs_lands_and_ours_fails() -> None:
        _folder(dest, "theirs")
        raise OSError(errno.EIO, "Input/output error")

    _Renames(monkeypatch, {3: theirs_lands_and_ours_fails})
    with pytest.raises(OSError) as err:
        records._place(tmp, dest)
    assert err.value.errno == errno.EIO
    assert _content(dest) == {"w.bin": "theirs"}
    (old,) = [p for p in tmp_path.iterdir() if p.name.endswith(".old")]
    assert _content(old) == {"w.bin": "old"}


def test_an_error_other_than_taken_is_raised_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp = _folder(tmp_path / ".adapter.tmp", "ours")

    def denied() -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    renames = _Renames(monkeypatch, {1: denied})
    with pytest.raises(PermissionError):
        records._place(tmp, tmp_path / "adapter")
    assert len(renames.calls) == 1 and _side(tmp_path) == [".adapter.tmp"]


def test_writers_that_keep_moving_dest_away_make_ours_give_up_after_100_tries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest, tmp = _taken(tmp_path)
    renames = _Renames(monkeypatch, {})

    def exchange(a: Path, b: Path) -> bool:
        raise FileNotFoundError(errno.ENOENT, "moved by another writer", str(b))

    monkeypatch.setattr(records, "exchange", exchange)
    with pytest.raises(OSError) as err:
        records._place(tmp, dest)
    assert err.value.errno == errno.EBUSY
    assert err.value.strerror == f"{dest}: other writers kept replacing it; gave up"
    assert err.value.filename == str(dest)
    assert len(renames.calls) == 100
    assert _content(dest) == {"w.bin": "old"} and _content(tmp) == {"w.bin": "ours"}


def test_with_renameat2_a_taken_dest_is_swapped_and_the_old_content_deleted(
    tmp_path: Path,
) -> None:
    _need_exchange(tmp_path)
    dest, tmp = _taken(tmp_path / "x")
    records._place(tmp, dest)
    assert _content(dest) == {"w.bin": "ours"} and _side(tmp_path / "x") == ["adapter"]


@pytest.fixture()
def busy_old_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """A file named ``busy.bin`` cannot be deleted (an NFS file another process holds open)."""
    fake_os = types.SimpleNamespace(**vars(os))

    def unlink(name: str, *args: object, **kwargs: object) -> None:
        if os.path.basename(name) == "busy.bin":
            raise OSError(errno.EBUSY, "Device or resource busy", name)
        os.unlink(name, *args, **kwargs)  # type: ignore[arg-type]

    fake_os.unlink = unlink
    monkeypatch.setattr(shutil, "os", fake_os)


@pytest.mark.usefixtures("busy_old_file")
@pytest.mark.parametrize("can_exchange", [True, False])
def test_old_content_that_cannot_be_deleted_never_fails_a_save_that_landed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, can_exchange: bool
) -> None:
    """Ours is in place: the old folder that will not go away is left beside it, and the save
    reports success (an error now would make the caller redo or abandon a finished save)."""
    if not can_exchange:
        monkeypatch.setattr(records, "exchange", lambda a, b: False)
    else:
        _need_exchange(tmp_path)
    root = tmp_path / "x"
    dest, tmp = _taken(root)
    (dest / "busy.bin").write_text("held open")
    records._place(tmp, dest)
    assert _content(dest) == {"w.bin": "ours"}
    (left,) = [p for p in root.iterdir() if p != dest]
    assert _content(left) == {"busy.bin": "held open"}
