"""hpc.fingerprint: what a stage pins for a model, a file and its settings, and the file it
writes; hpc.locks: what a contender reads of a flock holder, and a lock not held (mutants that
survived the fast suite)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from hpc import fingerprint, locks
from hpc.errors import PlanError
from hpc.locks import Busy, FileLock, holder_text

# --------------------------------------------------------------------------- fingerprint


def test_a_model_served_by_name_is_pinned_by_that_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model that is no folder here (a name on a running server) pins its name as
    ``path``, so another name is refused naming ``teacher.path`` with both."""
    monkeypatch.chdir(tmp_path)  # no folder of that name
    name = "Qwen/Qwen2.5-7B-Instruct"
    assert fingerprint.model(name) == {"path": name}
    old, new = {"teacher": fingerprint.model(name)}, {"teacher": fingerprint.model("other/m")}
    assert fingerprint.differences(old, new) == [f"teacher.path: {name} -> other/m"]


def test_a_file_that_is_not_there_or_not_given_pins_nothing(tmp_path: Path) -> None:
    """No path, an empty one, a missing file or a folder read as "no file" (None), never an
    error; a file is pinned by the sha256 of its bytes."""
    for absent in (None, "", tmp_path / "missing.json", str(tmp_path / "missing.json"), tmp_path):
        assert fingerprint.text_file(absent) is None, absent
    f = tmp_path / "ds.json"
    f.write_bytes(b'{"zero_optimization": {"stage": 2}}\n')
    assert fingerprint.text_file(f) == hashlib.sha256(f.read_bytes()).hexdigest()


def test_a_file_named_by_a_relative_path_is_pinned_whatever_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only an empty path means "no file": a template in the working folder is hashed, even one
    with a placeholder-like name."""
    monkeypatch.chdir(tmp_path)
    for name in ("XXXX", "t"):
        Path(name).write_text(f"Question: {{question}} ({name})\n")
        assert fingerprint.text_file(name) == hashlib.sha256(Path(name).read_bytes()).hexdigest()


def test_pinned_file_is_sorted_one_field_a_line(tmp_path: Path) -> None:
    """fingerprint.json is written readable and stable: keys sorted, one field a line, indented
    by one space per level, whatever order the stage built its fields in."""
    stage = tmp_path / "run" / "generate"
    fp = {"stage": "generate", "decoding": {"temperature": 0.7, "seed": 0},
          "teacher": {"path": "/m/t", "files": {}}}  # fmt: skip
    fingerprint.pin(stage, fp)
    assert (stage / "fingerprint.json").read_text().splitlines() == [
        "{",
        ' "decoding": {',
        '  "seed": 0,',
        '  "temperature": 0.7',
        " },",
        ' "stage": "generate",',
        ' "teacher": {',
        '  "files": {},',
        '  "path": "/m/t"',
        " }",
        "}",
    ]


def test_a_pinned_fingerprint_is_never_rewritten_by_a_matching_launch(tmp_path: Path) -> None:
    """check() says True when one is pinned; pin() then leaves the file's bytes as they are,
    even when written in another layout (an older version's, or restored by hand)."""
    stage = tmp_path / "generate"
    fp = {"stage": "generate", "decoding": {"seed": 0, "temperature": 0.7}}
    assert fingerprint.check(stage, fp) is False
    stage.mkdir()
    path = stage / fingerprint.FILE
    path.write_text(json.dumps(fp, indent=4) + "\n")
    before = path.read_bytes()
    assert fingerprint.check(stage, fp) is True
    fingerprint.pin(stage, fp)
    assert path.read_bytes() == before


def test_a_refusal_lists_each_differing_field_on_a_line_of_its_own(tmp_path: Path) -> None:
    stage = tmp_path / "run" / "train"
    fingerprint.pin(stage, {"hyperparameters": {"lr": 0.0002, "r": 8}, "seed": 0})
    with pytest.raises(PlanError) as e:
        fingerprint.check(stage, {"hyperparameters": {"lr": 0.001, "r": 16}, "seed": 0})
    assert str(e.value) == (
        f"{stage / 'fingerprint.json'}: refusing to relaunch train into this run folder with "
        "other settings; its output was made with the pinned ones. Differing:\n"
        "  hyperparameters.lr: 0.0002 -> 0.001\n"
        "  hyperparameters.r: 8 -> 16\n"
        "Use a new --run-dir, or the original settings."
    )


@pytest.mark.usefixtures("ascii_locale")
def test_a_pinned_fingerprint_in_utf8_is_read_the_same_under_any_locale(tmp_path: Path) -> None:
    """A fingerprint.json holding UTF-8 text (restored or rewritten by a JSON tool that does not
    escape it) matches the same settings in a launcher run under LANG=C, not "not valid JSON"."""
    stage = tmp_path / "generate"
    stage.mkdir()
    fp = {"teacher": {"path": "/mod\u00e8les/t\u00e9acher"}}
    (stage / "fingerprint.json").write_bytes(json.dumps(fp, ensure_ascii=False).encode())
    assert fingerprint.check(stage, fp) is True


# --------------------------------------------------------------------------- locks


def test_a_contender_reads_at_most_4_kib_of_a_holders_file(tmp_path: Path) -> None:
    """Whatever a holder wrote (here a job id of 5000 characters), Busy shows its first 4096
    bytes: reading another task's lock file is bounded."""
    path = tmp_path / "x.lock"
    with FileLock(path, {"job_id": "7" * 5000}, use_flock=True):
        text = path.read_text()
        assert len(text) > 4096
        with pytest.raises(Busy) as e:
            FileLock(path, use_flock=True).acquire()
    assert e.value.holder == text[:4096]


def test_a_contender_that_looks_while_the_holder_writes_sees_an_unknown_holder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between taking the flock and writing who it is, the holder's file is empty: a contender
    looking then is told "unknown holder", never a stray byte."""
    path = tmp_path / "x.lock"
    seen: list[dict[str, Any] | str] = []
    real_pwrite = os.pwrite

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        if not seen:  # the holder is about to write: another task looks now
            with pytest.raises(Busy) as e:
                FileLock(path, use_flock=True).acquire()
            seen.append(e.value.holder)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(locks.os, "pwrite", pwrite)
    lock = FileLock(path, use_flock=True).acquire()
    lock.release()
    assert seen == ["unknown holder"]
    assert holder_text(seen[0]) == "unknown holder"


@pytest.mark.parametrize("use_flock", [True, False])
def test_a_lock_not_held_has_no_kind(tmp_path: Path, use_flock: bool) -> None:
    """``kind`` is "" before acquire and again after release: a released lock reads as none."""
    lock = FileLock(tmp_path / "x.lock", use_flock=use_flock)
    assert lock.kind == ""
    lock.acquire()
    assert lock.kind == ("flock" if use_flock else "O_EXCL file")
    lock.release()
    assert lock.kind == ""
