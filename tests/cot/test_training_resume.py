"""Fast tests of cot.training's loss-mask and resume promises, with no torch or transformers.

The tokenizers are word-level stand-ins that behave like the real kinds where it matters: the
fast one glues leading whitespace to the next word (so a token can straddle the prompt/answer
seam, as BPE merges do) and reports character offsets; the slow one has no offsets at all.
The distributed paths run against a fake ``torch.distributed`` that behaves like one rank of a
two-rank group (what it receives from rank 0, what the other rank's flag is).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from cot import training as T
from cot.errors import InputError
from cot.prompts import student_prompt

IGNORE = T.IGNORE_INDEX


# --------------------------------------------------------------------------- tokenizers


class _Words:
    """A slow tokenizer: one token per word with its leading whitespace, a BOS special token,
    no offsets (asking for them fails, as with Python tokenizers) and no ``is_fast``."""

    bos_token_id = 1
    eos_token_id = 2

    def __init__(self) -> None:
        self.vocab = {"<s>": 1, "</s>": 2}

    def _encode(self, text: str, add_special_tokens: bool) -> tuple[list[int], list[tuple]]:
        spans = [m.span() for m in re.finditer(r"\s*\S+|\s+$", text)]
        ids = [self.vocab.setdefault(text[s:e], len(self.vocab) + 1) for s, e in spans]
        if add_special_tokens:
            ids, spans = [self.bos_token_id, *ids], [(0, 0), *spans]
        return ids, spans

    def __call__(
        self, text: str, add_special_tokens: bool = True, return_offsets_mapping: bool = False
    ) -> dict[str, Any]:
        if return_offsets_mapping:
            raise NotImplementedError("return_offset_mapping is not available (slow tokenizer)")
        return {"input_ids": self._encode(text, add_special_tokens)[0]}

    def ids(self, pieces: list[str]) -> list[int]:
        return [self.vocab[p] for p in pieces]


class _FastWords(_Words):
    """The same words as a fast tokenizer: one pass over the whole text, with offsets."""

    is_fast = True

    def __call__(
        self, text: str, add_special_tokens: bool = True, return_offsets_mapping: bool = False
    ) -> dict[str, Any]:
        ids, spans = self._encode(text, add_special_tokens)
        enc: dict[str, Any] = {"input_ids": ids}
        if return_offsets_mapping:
            enc["offset_mapping"] = spans
        return enc


PROMPT = ["<s>", "###", " Question:", "\nQ?", "\n\n###", " Answer:"]
COT = "x = 4.\nFinal Answer: 4"


def _example(tok: _Words, pieces: list[str], trained: list[bool]) -> dict[str, Any]:
    ids = tok.ids(pieces)
    labels = [t if m else IGNORE for t, m in zip(ids, trained, strict=True)]
    return {"input_ids": ids, "labels": labels, "length": len(ids)}


def test_fast_tokenizer_trains_on_answer_tokens_after_the_seam_only() -> None:
    assert student_prompt("Q?") == "### Question:\nQ?\n\n### Answer:\n"
    tok = _FastWords()
    out = T.encode_example(tok, "Q?", COT, max_length=13)  # exactly the full length: no cut
    # "\nx" starts inside the prompt (its "\n") and so stays with it; BOS (0, 0) never trains.
    pieces = [*PROMPT, "\nx", " =", " 4.", "\nFinal", " Answer:", " 4", "</s>"]
    full = _example(tok, pieces, [False] * 7 + [True] * 6)
    assert out == (full, "ok")
    assert T.encode_example(tok, "Q?", COT, max_length=13, overlong="drop") == (full, "ok")
    # One token too many: cut (losing EOS) by default, or the record dropped.
    cut = _example(tok, pieces[:12], [False] * 7 + [True] * 5)
    assert T.encode_example(tok, "Q?", COT, max_length=12) == (cut, "truncated")
    assert T.encode_example(tok, "Q?", COT, 12, overlong="truncate") == (cut, "truncated")
    assert T.encode_example(tok, "Q?", COT, 12, overlong="drop") == (None, "dropped_overlong")
    # Cut inside the prompt: nothing left to train on.
    assert T.encode_example(tok, "Q?", COT, max_length=7) == (None, "dropped_no_answer")


def test_slow_tokenizer_splits_prompt_and_answer_without_special_tokens_in_the_answer() -> None:
    tok = _Words()  # no is_fast attribute at all: treated as slow, offsets never asked for
    out = T.encode_example(tok, "Q?", COT, max_length=100)
    pieces = [*PROMPT, "\n", "x", " =", " 4.", "\nFinal", " Answer:", " 4", "</s>"]
    assert out == (_example(tok, pieces, [False] * 7 + [True] * 7), "ok")


def test_a_tokenizer_without_eos_is_refused_by_name() -> None:
    tok = _FastWords()
    tok.eos_token_id = None  # type: ignore[assignment]
    with pytest.raises(InputError) as err:
        T.encode_example(tok, "Q?", COT, max_length=100)
    assert str(err.value) == "the tokenizer has no eos token; cannot mark the end of an answer"


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture()
def single(monkeypatch: pytest.MonkeyPatch) -> None:
    """One process, no process group (what ``_dist()`` says outside torchrun)."""
    monkeypatch.setattr(T, "_dist", lambda: None)


def _ckpt(root: Path, step: int, *, complete: bool = True) -> Path:
    c = root / f"checkpoint-{step}"
    c.mkdir(parents=True)
    (c / "adapter_model.safetensors").write_bytes(b"x" * (10 + step))
    if complete:
        T.write_checkpoint_marker(c, step)
    return c


def _steps(root: Path) -> list[int | None]:
    return [T.checkpoint_step(p) for p in T.list_checkpoints(root)]


def test_the_marker_lists_the_step_and_each_file_with_its_size_one_per_line(
    tmp_path: Path,
) -> None:
    """What a user reading COMPLETE sees (cat, grep): one field per line, extra info kept."""
    c = _ckpt(tmp_path, 7, complete=False)
    (c / "optimizer.pt").write_bytes(b"o" * 3)
    marker = T.write_checkpoint_marker(c, 7, global_step=7)
    assert marker == c / "COMPLETE"
    assert marker.read_text(encoding="utf-8").splitlines() == [
        "{",
        ' "step": 7,',
        ' "files": {',
        '  "adapter_model.safetensors": 17,',
        '  "optimizer.pt": 3',
        " },",
        ' "global_step": 7',
        "}",
    ]


def test_a_marker_that_lists_no_files_is_not_complete(tmp_path: Path) -> None:
    c = _ckpt(tmp_path, 1)
    assert T.checkpoint_complete(c)
    marker = c / T.CHECKPOINT_MARKER
    for text in ('{"step": 1, "files": {}}', '{"files": ["adapter_model.safetensors"]}',
                 '{"step": 1}', "[]", "null"):  # fmt: skip
        marker.write_text(text)
        assert not T.checkpoint_complete(c), text
    assert T.latest_complete_checkpoint(tmp_path) is None


def test_rotation_keeps_the_newest_complete_and_removes_torn_ones_below_it(
    tmp_path: Path,
) -> None:
    c2, c4, c8 = _ckpt(tmp_path, 2), _ckpt(tmp_path, 4), _ckpt(tmp_path, 8)
    c3 = _ckpt(tmp_path, 3, complete=False)
    c6 = _ckpt(tmp_path, 6, complete=False)  # torn, between the two newest complete ones
    _ckpt(tmp_path, 10, complete=False)  # newer than the newest complete: maybe being written
    # keep=0 still keeps the newest complete one: a resume always has somewhere to go.
    assert T.checkpoints_to_delete(tmp_path, keep=0) == [c2, c3, c4, c6]
    assert T.rotate_checkpoints(tmp_path, keep=1) == [c2, c3, c4, c6]
    assert _steps(tmp_path) == [8, 10]
    assert T.latest_complete_checkpoint(tmp_path) == c8


@pytest.mark.usefixtures("single")
def test_cleanup_never_follows_a_symlinked_checkpoint(tmp_path: Path) -> None:
    """A folder that rotation or the resume cannot remove (here a symlink, which rmtree
    refuses) neither stops the training nor lets the deletion reach the data it points to."""
    root, elsewhere = tmp_path / "checkpoints", _ckpt(tmp_path / "keep", 1, complete=False)
    root.mkdir()
    for step in (1, 9):  # torn, older and newer than the newest complete one
        (root / f"checkpoint-{step}").symlink_to(elsewhere, target_is_directory=True)
    c2, c5 = _ckpt(root, 2), _ckpt(root, 5)
    # Only what is really gone is reported gone (the log says "removed old checkpoint ...").
    assert T.rotate_checkpoints(root, keep=1) == [c2]
    assert (root / "checkpoint-1").is_symlink()
    assert T._choose_resume(None, root) == str(c5)
    assert (elsewhere / "adapter_model.safetensors").exists() and not c2.exists()


def test_torn_after_names_only_incomplete_checkpoints_newer_than_the_step(tmp_path: Path) -> None:
    _ckpt(tmp_path, 3, complete=False)  # older than the resume point: rotation's business
    _ckpt(tmp_path, 5)
    _ckpt(tmp_path, 10)  # complete: never torn, even when resuming from an older one
    c12 = _ckpt(tmp_path, 12, complete=False)
    assert T.torn_after(tmp_path, 5) == [c12]
    assert T.torn_after(tmp_path, 12) == []
    assert T.torn_after(tmp_path / "none", 0) == []


# --------------------------------------------------------------------------- resume choice


@pytest.mark.usefixtures("single")
def test_resume_from_scratch_removes_every_torn_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    c1, c3 = _ckpt(tmp_path, 1, complete=False), _ckpt(tmp_path, 3, complete=False)
    assert T._choose_resume(None, tmp_path) is None
    assert not c1.exists() and not c3.exists()
    out = capsys.readouterr()
    assert out.err == f"skipping incomplete checkpoint {c3}\nskipping incomplete checkpoint {c1}\n"
    assert out.out == (
        "removing torn checkpoint checkpoint-1 (no complete marker)\n"
        "removing torn checkpoint checkpoint-3 (no complete marker)\n"
    )


@pytest.mark.usefixtures("single")
def test_explicit_resume_is_resolved_and_a_markerless_one_kept_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "ckpts"
    c5 = _ckpt(root, 5)
    c10 = _ckpt(root, 10, complete=False)  # asked for by name although it has no marker
    c12 = _ckpt(root, 12, complete=False)
    assert T._choose_resume("ckpts/checkpoint-10", root) == str(c10)  # relative, made absolute
    assert c10.exists() and c5.exists() and not c12.exists()  # only what is newer goes
    out = capsys.readouterr()
    assert out.err == "ckpts/checkpoint-10 has no completion marker; resuming from it as asked\n"
    assert out.out == "removing torn checkpoint checkpoint-12 (no complete marker)\n"
    assert T._choose_resume("ckpts/checkpoint-5", root) == str(c5)
    assert capsys.readouterr().err == ""  # complete: no warning
    assert not c10.exists()  # now newer than the resume point, and torn


def _aside(root: Path) -> list[Path]:
    """The checkpoints an explicit start moved aside, oldest step first."""
    found = (root / T.SUPERSEDED).glob("from-step-*/checkpoint-*")
    return sorted(found, key=lambda p: T.checkpoint_step(p) or 0)


@pytest.mark.usefixtures("single")
def test_explicit_resume_from_an_older_step_moves_the_newer_complete_ones_aside(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Training again from step 5 saves its own step 10: the old complete checkpoint-10 must not
    be there to be written into (its old marker would vouch for a half-written mix) nor be
    chosen by a later resume, and it is another line of training, so it is kept, not deleted,
    where nothing that lists or rotates checkpoints can see it."""
    root = tmp_path / "ckpts"
    c5, c10, c15 = _ckpt(root, 5), _ckpt(root, 10), _ckpt(root, 15)
    old10 = (c10 / "adapter_model.safetensors").read_bytes()
    assert T._choose_resume(str(c5), root) == str(c5)
    assert _steps(root) == [5] and not c10.exists() and not c15.exists()
    aside = _aside(root)
    assert [p.name for p in aside] == ["checkpoint-10", "checkpoint-15"]
    assert aside[0].parent.name.startswith("from-step-5.")
    assert (aside[0] / "adapter_model.safetensors").read_bytes() == old10
    assert T.checkpoint_complete(aside[1])  # a folder that --resume-from-checkpoint takes
    assert not list(root.glob("checkpoint-*.*"))  # nothing the Trainer's own rotation globs
    assert capsys.readouterr().err == "".join(
        f"moved checkpoint-{p.name[11:]} aside to {p} (newer than the resume point {c5}: "
        "another line of training)\n"
        for p in aside
    )
    # the newest complete one, resumed automatically, moves nothing
    assert T._choose_resume(None, root) == str(c5)
    assert _aside(root) == aside and _steps(root) == [5]


@pytest.mark.usefixtures("single")
def test_a_requeue_or_relaunch_of_an_explicit_start_goes_on_from_its_own_progress(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same ``--resume-from-checkpoint`` again (a requeue, a restart, a relaunch after the
    time limit): training goes on from what it saved since the start, not from the start again
    (which would move that progress aside and redo it); even once rotation removed the start."""
    root = tmp_path / "ckpts"
    c5 = _ckpt(root, 5)
    _ckpt(root, 20)
    assert T._choose_resume(str(c5), root) == str(c5)  # 20 moved aside
    capsys.readouterr()
    assert T._choose_resume(str(c5), root) == str(c5)  # preempted before a save
    assert capsys.readouterr().out == ""  # the start itself is no progress to announce
    c8 = _ckpt(root, 8)
    assert T._choose_resume(str(c5), root) == str(c8)
    assert capsys.readouterr().out == (
        f"resuming from checkpoint-8, saved since training started from {c5}\n"
    )
    shutil.rmtree(c5)  # rotation (keep 1) removed the start
    c9 = _ckpt(root, 9)
    assert T._choose_resume(str(c5), root) == str(c9)
    assert _steps(root) == [8, 9] and [p.name for p in _aside(root)] == ["checkpoint-20"]


@pytest.mark.usefixtures("single")
def test_another_explicit_start_is_a_new_line_of_training(tmp_path: Path) -> None:
    """A start other than the recorded one, or a first start after an automatic resume, moves
    aside what is newer than it, and what is older stays: it is not this line's progress."""
    root, other = tmp_path / "ckpts", tmp_path / "other"
    c5, c8 = _ckpt(root, 5), _ckpt(root, 8)
    assert T._choose_resume(None, root) == str(c8)
    c100 = _ckpt(other, 100)
    assert T._choose_resume(str(c100), root) == str(c100)  # root's older ones are not progress
    assert _steps(root) == [5, 8]
    assert T._choose_resume(str(c5), root) == str(c5)  # back to 5: 8 goes aside
    assert _steps(root) == [5] and [p.name for p in _aside(root)] == ["checkpoint-8"]


@pytest.mark.usefixtures("single")
def test_an_explicit_start_without_a_step_in_its_name_starts_at_its_trainer_state(
    tmp_path: Path,
) -> None:
    """A start that is not a ``checkpoint-N`` folder (a copy kept elsewhere) resumes at its
    trainer state's global step; with none, the Trainer counts from 0 and every complete
    checkpoint of this run, even checkpoint-1, is another line of training."""
    root = tmp_path / "ckpts"
    copy = _ckpt(tmp_path / "elsewhere", 3).rename(tmp_path / "elsewhere" / "kept")
    (copy / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    c1, c4 = _ckpt(root, 1), _ckpt(root, 4)
    assert T.start_step(copy) == 3
    assert T._choose_resume(str(copy), root) == str(copy)
    assert _steps(root) == [1] and [p.name for p in _aside(root)] == ["checkpoint-4"]
    (copy / "trainer_state.json").unlink()
    assert T.start_step(copy) == 0
    bare = copy.rename(tmp_path / "elsewhere" / "bare")
    assert T._choose_resume(str(bare), root) == str(bare)
    assert _steps(root) == [] and not c1.exists() and not c4.exists()
    c1 = _ckpt(root, 1)
    assert T._choose_resume(str(bare), root) == str(c1)  # its own progress, even step 1


@pytest.mark.parametrize(
    "text", ["[]", '"x"', '{"path": 1, "step": 1}', '{"path": "/c"}', '{"path": "/c", "step": "1"}']
)
def test_a_start_record_that_is_not_ours_counts_as_none(tmp_path: Path, text: str) -> None:
    """A damaged or foreign .resume_start.json never crashes a resume: it is no record (so the
    explicit start is taken as new, and nothing is taken for this line's progress)."""
    (tmp_path / T.START_RECORD).write_text(text)
    assert T.recorded_start(tmp_path) is None
    assert not T.started_from(tmp_path, "/c")
    (tmp_path / T.START_RECORD).write_text('{"path": "/c", "step": 4}')
    assert T.recorded_start(tmp_path) == {"path": "/c", "step": 4}


@pytest.mark.usefixtures("single")
def test_explicit_resume_from_a_missing_folder_is_refused_by_name(tmp_path: Path) -> None:
    missing = str(tmp_path / "checkpoint-7")
    with pytest.raises(InputError) as err:
        T._choose_resume(missing, tmp_path)
    assert str(err.value) == f"--resume-from-checkpoint {missing}: no such folder"


class _FakeDist:
    """``torch.distributed`` as one rank of a two-rank NCCL group sees it."""

    class ReduceOp:
        SUM, MAX = "sum", "max"

    def __init__(self, rank: int, *, from_rank0: Any = None, peer_flag: bool = False) -> None:
        self.rank, self.from_rank0, self.peer_flag = rank, from_rank0, peer_flag
        self.device = f"cuda:{rank}"
        self.sent: list[list[Any]] = []

    def get_rank(self) -> int:
        return self.rank

    def get_world_size(self) -> int:
        return 2

    def broadcast_object_list(self, object_list: list[Any], src: int | None = None) -> None:
        src = 0 if src is None else src  # torch's default
        if src == self.rank:
            self.sent.append(list(object_list))
        else:  # what the sender (rank 0 here, else this fake's peer, which has nothing) sent
            object_list[:] = [self.from_rank0 if src == 0 else None]

    def all_reduce(self, tensor: Any, op: str = ReduceOp.SUM) -> None:
        if tensor.device != self.device:
            raise RuntimeError("NCCL reduces only tensors on this rank's GPU")
        combine = {"sum": lambda a, b: a + b, "max": max}[op]
        tensor.values = [combine(tensor.values[0], int(self.peer_flag))]


def test_rank0_decides_and_broadcasts_and_other_ranks_touch_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c5 = _ckpt(tmp_path, 5)
    c10 = _ckpt(tmp_path, 10, complete=False)
    rank1 = _FakeDist(1, from_rank0=str(c5))
    monkeypatch.setattr(T, "_dist", lambda: rank1)
    assert T._choose_resume(None, tmp_path) == str(c5)  # what rank 0 sent
    assert c10.exists() and rank1.sent == []  # rank 1 neither removes nor decides
    rank0 = _FakeDist(0)
    monkeypatch.setattr(T, "_dist", lambda: rank0)
    assert T._choose_resume(None, tmp_path) == str(c5)
    assert rank0.sent == [[str(c5)]] and not c10.exists()


@pytest.mark.parametrize("peer", [False, True])
@pytest.mark.parametrize("mine", [False, True])
def test_any_rank_is_true_everywhere_when_one_rank_is(
    monkeypatch: pytest.MonkeyPatch, mine: bool, peer: bool
) -> None:
    monkeypatch.setattr(T, "_dist", lambda: None)
    assert T.any_rank(mine, "cpu") is mine  # one process: its own flag
    torch = types.ModuleType("torch")

    class Tensor:
        def __init__(self, data: list[int], dtype: Any = None, device: Any = None) -> None:
            self.values, self.device = list(data), device

        def item(self) -> int:
            return self.values[0]

    torch.tensor, torch.int32 = Tensor, "int32"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch", torch)
    dist = _FakeDist(1, peer_flag=peer)
    monkeypatch.setattr(T, "_dist", lambda: dist)
    assert T.any_rank(mine, "cuda:1") is (mine or peer)
