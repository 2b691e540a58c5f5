"""The shard files of hpc/shards.py byte for byte: recovery of a torn tail, finish_shard's
rewrite and marker, the verified merge's messages (FILE:LINE, sizes and checksums), the
progress counters; and the ``merge`` stage run by hand (hpc/stages/merge.py)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import zlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from cot.sources import ids_digest
from hpc import shards as S
from hpc.backends import DoneHandle
from hpc.stages.merge import MergeStage
from jobs.merge import Merge
from tests.hpc.test_shards import _complete_all, _line, _rec, _stage


def _keep_all(recs: list[dict[str, Any]]) -> list[bool]:
    return [True] * len(recs)


def _write_shard(stage_dir: Path, shard: int, keys: list[tuple[str, int]]) -> Path:
    path = S.shard_path(stage_dir, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(_line(_rec(rid, s)) for rid, s in keys))
    return path


def _plan_bytes(plan: S.Plan, shard: int) -> bytes:
    return "".join(_line(_rec(rid, s)) for rid, s in plan.keys(shard)).encode()


# --------------------------------------------------------------------------- plan


def test_keys_of_given_records_never_read_the_input(tmp_path: Path) -> None:
    """A task reads its slice once: keys of records it already holds need no input at all."""
    _, plan = _stage(tmp_path, 6, 2, samples=2)
    records = plan.records(1)
    Path(plan.input).unlink()
    assert plan.keys(1, records) == [
        ("q003", 0), ("q003", 1), ("q004", 0), ("q004", 1), ("q005", 0), ("q005", 1)
    ]  # fmt: skip
    assert plan.keys(0, [{"id": "other"}]) == [("other", 0), ("other", 1)]
    with pytest.raises(S.PlanError, match=r"^shard 1: .*q\.jsonl: file not found"):
        plan.keys(1)


def test_records_refuse_a_plan_whose_count_disagrees_with_its_slice(tmp_path: Path) -> None:
    """The slice's bytes are intact but the plan says it holds another number of records
    (an edited plan.json): refused, naming the input and the shard."""
    _, plan = _stage(tmp_path, 6, 2)
    plan.slices[1][0] = 4
    with pytest.raises(S.PlanError) as err:
        plan.records(1)
    assert str(err.value) == (
        f"{plan.input}: shard 1 no longer holds its 4 planned records; "
        "relaunch into a new --run-dir"
    )


# --------------------------------------------------------------------------- recover


def test_recover_leaves_an_intact_shard_untouched(tmp_path: Path) -> None:
    """A task restarting on a shard with no torn tail finds its keys and does not write it."""
    path = tmp_path / "00000.jsonl"
    data = (_line(_rec("a")) + _line(_rec("a", 1)) + _line(_rec("b"))).encode()
    path.write_bytes(data)
    os.utime(path, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    assert S.recover_shard(path) == {("a", 0): 1, ("a", 1): 2, ("b", 0): 3}
    assert path.read_bytes() == data
    assert path.stat().st_mtime_ns == 1_000_000_000_000_000_000


# --------------------------------------------------------------------------- finish


@pytest.mark.parametrize("fault", ["first_two_swapped", "foreign_record_at_the_end"])
def test_finish_rewrites_a_shard_not_in_plan_order(tmp_path: Path, fault: str) -> None:
    """Every key there, but two swapped or one record the plan does not own after them: the
    shard is rewritten to exactly the plan's records in plan order, and the marker seals it."""
    stage_dir, plan = _stage(tmp_path, 6, 2)
    keys = plan.keys(1)
    if fault == "first_two_swapped":
        written = [keys[1], keys[0], *keys[2:]]
    else:
        written = [*keys, ("q999", 0)]
    path = _write_shard(stage_dir, 1, written)
    assert S.finish_shard(stage_dir, plan, 1) == 3
    data = _plan_bytes(plan, 1)
    assert path.read_bytes() == data
    assert S.read_marker(stage_dir, 1) == {
        "records": 3,
        "errors": 0,
        "bytes": len(data),
        "crc32": zlib.crc32(data),
        "slice": plan.digest(1),
    }


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ('{"id": "q003", "sample": 0, oops\n', "not a valid JSON record"),
        ('{"sample": 0, "cot": "no id"}\n', "record has no 'id' field"),
    ],
)
def test_finish_names_the_file_and_line_of_a_bad_record(
    tmp_path: Path, bad: str, message: str
) -> None:
    stage_dir, plan = _stage(tmp_path, 6, 2)
    keys = plan.keys(1)
    path = _write_shard(stage_dir, 1, keys)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + bad + "".join(lines[1:]))
    with pytest.raises(S.PlanError) as err:
        S.finish_shard(stage_dir, plan, 1)
    assert str(err.value).startswith(f"{path}:2: {message}")
    assert not S.marker_path(stage_dir, 1).exists()


def test_finish_with_the_task_keys_does_not_read_the_input_again(tmp_path: Path) -> None:
    """``finish_shard`` takes the keys the task computed from its slice: the input may be gone
    (or slow to read) by then, and the shard is still checked against those keys."""
    stage_dir, plan = _stage(tmp_path, 6, 2)
    keys = plan.keys(0)
    path = _write_shard(stage_dir, 0, keys)
    Path(plan.input).unlink()
    assert S.finish_shard(stage_dir, plan, 0, keys) == 3
    assert S.read_marker(stage_dir, 0)["bytes"] == len(path.read_bytes())
    _write_shard(stage_dir, 1, [("q003", 0)])
    with pytest.raises(S.PlanError, match=r"shard 1 is missing 1 records, e\.g\. \('q004', 0\)"):
        S.finish_shard(stage_dir, plan, 1, [("q003", 0), ("q004", 0)])


# --------------------------------------------------------------------------- marker, progress


def test_write_marker_creates_its_folder_once_and_only_once(tmp_path: Path) -> None:
    stage_dir = tmp_path / "fresh run" / "evaluate"
    fields = {"records": 2, "errors": 1, "bytes": 80, "crc32": 7, "slice": "ab"}
    old = os.umask(0o022)
    try:
        S.write_marker(stage_dir, 3, fields)
    finally:
        os.umask(old)
    marker = stage_dir / "completions" / "00003"
    assert json.loads(marker.read_text()) == fields == S.read_marker(stage_dir, 3)
    assert stat.S_IMODE(marker.stat().st_mode) == 0o644
    with pytest.raises(S.PlanError) as err:
        S.write_marker(stage_dir, 3, {"records": 0})
    assert str(err.value) == f"{marker}: shard 3 is already marked complete"
    assert json.loads(marker.read_text()) == fields


def test_progress_round_trips_in_a_fresh_stage_folder(tmp_path: Path) -> None:
    stage_dir = tmp_path / "fresh run" / "generate"
    assert S.read_progress(stage_dir, 2) == 0
    S.write_progress(stage_dir, 2, 17)
    S.write_progress(stage_dir, 2, 18)
    assert S.read_progress(stage_dir, 2) == 18
    assert S.read_progress(stage_dir, 3) == 0
    assert sorted(p.name for p in (stage_dir / "progress").iterdir()) == ["00002"]
    assert (stage_dir / "progress" / "00002").read_text() == "18"


def test_append_attempt_writes_utf8_json_lines(tmp_path: Path) -> None:
    stage_dir = tmp_path / "generate"
    assert S.append_attempt(stage_dir, 0, {"event": "start", "host": "nœud-1"}) == 1
    assert S.append_attempt(stage_dir, 0, {"event": "resume", "on_disk": 4}) == 2
    assert (stage_dir / "attempts" / "00000").read_bytes().decode("utf-8") == (
        '{"event": "start", "host": "nœud-1"}\n{"event": "resume", "on_disk": 4}\n'
    )


# --------------------------------------------------------------------------- merge messages


def test_a_changed_shard_is_named_with_its_and_its_marker_sizes_and_checksums(
    tmp_path: Path,
) -> None:
    """Still valid JSON everywhere: the message gives both byte counts and crc32s, and says
    what to remove before relaunching."""
    stage_dir, plan = _stage(tmp_path, 6, 2)
    _complete_all(stage_dir, plan)
    path = S.shard_path(stage_dir, 1)
    sealed = path.read_bytes()
    changed = sealed.replace(b"text of q004", b"text of q004 and more")
    path.write_bytes(changed)
    expected = (
        f"{path}: changed after it was marked complete ({len(changed)} bytes, crc32 "
        f"{zlib.crc32(changed):08x}; its marker says {len(sealed)} bytes, crc32 "
        f"{zlib.crc32(sealed):08x}). Remove it and completions/00001, then relaunch the same "
        "command to redo this shard"
    )
    for keep in (None, _keep_all):
        with pytest.raises(S.PlanError) as err:
            S.write_merged(stage_dir, plan, [], keep=keep)
        assert str(err.value) == expected


def test_a_byte_flipped_into_invalid_utf8_is_named_by_file_and_line(tmp_path: Path) -> None:
    stage_dir, plan = _stage(tmp_path, 6, 2)
    _complete_all(stage_dir, plan)
    path = S.shard_path(stage_dir, 1)
    data = bytearray(path.read_bytes())
    second = data.index(b"\n") + 1
    data[data.index(b"text of", second)] = 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(S.PlanError, match=rf"^{path}:2: not a valid JSON record"):
        S.write_merged(stage_dir, plan, [])
    assert not (stage_dir / "merged.jsonl").exists()


@pytest.mark.parametrize("fault", ["swapped", "bad_json", "extra_line", "short"])
def test_the_parsing_merge_names_the_file_line_and_record(tmp_path: Path, fault: str) -> None:
    """With ``--keep`` every line is parsed: a record out of place is named by file, line and
    the record expected there."""
    stage_dir, plan = _stage(tmp_path, 9, 3)
    _complete_all(stage_dir, plan)
    path = S.shard_path(stage_dir, 1)
    lines = path.read_text().splitlines(keepends=True)
    if fault == "swapped":
        lines[1], lines[2] = lines[2], lines[1]
        expected = f"{path}:2: expected record ('q004', 0), found ('q005', 0)"
    elif fault == "bad_json":
        lines[1] = '{"id": "q004", GARBAGE\n'
        expected = f"{path}:2: not a valid JSON record"
    elif fault == "extra_line":
        lines.append(_line(_rec("q006")))
        expected = f"{path}:4: expected record None, found ('q006', 0)"
    else:
        lines = lines[:2]
        expected = f"{path}: shard 1 ends before record ('q005', 0)"
    path.write_text("".join(lines))
    (stage_dir / "merged.jsonl").write_text("old\n")
    with pytest.raises(S.PlanError) as err:
        S.write_merged(stage_dir, plan, [], keep=_keep_all)
    assert str(err.value).startswith(expected)
    assert (stage_dir / "merged.jsonl").read_text() == "old\n"


# --------------------------------------------------------------------------- merge stage


def test_merge_stage_takes_output_and_keep_from_the_run_config(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    bare = MergeStage.from_run(run_dir, "generate", None, None)
    assert (bare.name, bare.stage, bare.output, bare.keep) == ("merge", "generate", None, "all")
    assert bare.outputs() == [run_dir / "generate" / "merged.jsonl"]
    (run_dir / "config.yaml").write_text(
        yaml.safe_dump(
            {"generate": {"output": "/data/traces.jsonl", "keep": "correct"}, "evaluate": None}
        )
    )
    recorded = MergeStage.from_run(run_dir, "generate", None, None)
    assert (recorded.output, recorded.keep) == ("/data/traces.jsonl", "correct")
    assert recorded.outputs() == [
        run_dir / "generate" / "merged.jsonl",
        Path("/data/traces.jsonl"),
    ]
    given = MergeStage.from_run(run_dir, "generate", "mine.jsonl", "majority")
    assert (given.output, given.keep) == ("mine.jsonl", "majority")
    scores = MergeStage.from_run(run_dir, "evaluate", None, None)
    assert (scores.output, scores.keep) == (None, "all")
    call = recorded.call()
    assert isinstance(call.fn, Merge)
    assert call.args == (str(run_dir), "generate", ["/data/traces.jsonl"], "correct")
    assert call.label == "merge"
    assert bare.call().args == (str(run_dir), "generate", [], "all")


def test_merge_stage_by_hand_waits_for_its_dependencies_then_merges_here(tmp_path: Path) -> None:
    stage_dir, plan = _stage(tmp_path, 6, 2)
    _complete_all(stage_dir, plan)
    run_dir = stage_dir.parent
    out = tmp_path / "traces.jsonl"
    stage = MergeStage(run_dir, "generate", str(out), "all")
    (stage_dir / "merged.jsonl").write_text("an interrupted merge\n")  # no merge.json yet
    assert not stage.is_complete()
    waited: list[str] = []

    class Dep(DoneHandle):
        def wait(self, on_poll: Any = None) -> None:
            waited.append("dep")

    handle = stage.submit(backend=None, after=[Dep(), Dep()])  # type: ignore[arg-type]
    assert waited == ["dep", "dep"]
    assert isinstance(handle, DoneHandle) and handle.new and handle.labels == ["merge"]
    (counts,) = handle.results()
    assert (counts["total"], counts["kept"], counts["outputs"]) == (6, 6, [str(out)])
    assert stage.is_complete()
    assert out.read_bytes() == (stage_dir / "merged.jsonl").read_bytes()
    assert out.read_bytes() == _plan_bytes(plan, 0) + _plan_bytes(plan, 1)


# --------------------------------------------------------------------------- plan.json


def test_plan_json_is_one_header_and_one_line_per_shard(tmp_path: Path) -> None:
    """plan.json pins the input (sha256), the shard count, the samples and, per shard, its
    record count, ids digest and byte range (with its first line and the range's sha256)."""
    path = tmp_path / "q.jsonl"
    data = "".join(json.dumps({"id": f"q{i}", "question": f"{i}?"}) + "\n" for i in range(5))
    path.write_text(data)
    raw = data.encode()
    cut = raw.index(b'{"id": "q2"')
    sha = hashlib.sha256(raw).hexdigest()

    def piece(lo: int, hi: int) -> str:
        return hashlib.sha256(raw[lo:hi]).hexdigest()[:32]

    stage_dir = tmp_path / "run" / "generate"
    stage_dir.mkdir(parents=True)  # the stage folder may exist before its plan (its logs)
    plan = S.write_or_check_plan(stage_dir, S.make_plan(path, 2, 3))
    text = (stage_dir / "plan.json").read_text()
    assert text == (
        "{\n"
        f' "input": "{path}",\n'
        f' "input_sha256": "{sha}",\n'
        ' "num_records": 5,\n "shards": 2,\n "samples": 3,\n "selection": {},\n'
        f' "files": [\n  [\n   "",\n   "jsonl",\n   "{sha}"\n  ]\n ],\n'
        ' "format": 2,\n'
        ' "slices": [\n'
        f'  [2, "{ids_digest(["q0", "q1"])}", [[0, 0, {cut}, 1, "{piece(0, cut)}"]]],\n'
        f'  [3, "{ids_digest(["q2", "q3", "q4"])}", '
        f'[[0, {cut}, {len(raw)}, 3, "{piece(cut, len(raw))}"]]]\n'
        " ]\n}"
    )
    assert S.load_plan(stage_dir) == plan
    assert plan.ranges == [(0, 2), (2, 5)]
    start = raw.index(b'{"id": "q1"')
    end = raw.index(b'{"id": "q4"')
    picked = S.make_plan(path, 1, selection={"start_index": 1, "num_samples": 3})
    assert (picked.num_records, picked.selection) == (3, {"start_index": 1, "num_samples": 3})
    assert picked.slices == [
        [3, ids_digest(["q1", "q2", "q3"]), [[0, start, end, 2, piece(start, end)]]]
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "{path}: no plan here; was the stage launched into this run folder?"),
        (
            "[1, 2]",
            "{path}: plan format ?, written by an older cot-hpc (this one reads format 2: byte "
            "ranges instead of every id). Finish that run with the version that launched it, "
            "or launch into a new --run-dir",
        ),
        ('{"format": 3}', "{path}: plan format 3, written by an older cot-hpc (this one"),
        ('{"format": 2, "input": "q"}', "{path}: not a plan this version can read ("),
        ('{"format": 2,', "{path}: unreadable plan ("),
    ],
)
def test_a_plan_this_version_cannot_use_is_refused_naming_it(
    tmp_path: Path, content: str | None, message: str
) -> None:
    stage_dir = tmp_path / "generate"
    stage_dir.mkdir()
    path = stage_dir / "plan.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(S.PlanError) as err:
        S.load_plan(stage_dir)
    assert str(err.value).startswith(message.format(path=path))


def test_a_relaunch_with_other_settings_lists_every_difference(tmp_path: Path) -> None:
    stage_dir, plan = _stage(tmp_path, 6, 2)
    other = tmp_path / "other.jsonl"
    other.write_bytes(Path(plan.input).read_bytes() + b"\n")
    new = S.make_plan(other, 3, samples=2)
    with pytest.raises(S.PlanError) as err:
        S.write_or_check_plan(stage_dir, new)
    assert str(err.value) == (
        f"{stage_dir / 'plan.json'}: refusing to relaunch into this run folder: input {other} "
        f"(sha256 {new.input_sha256[:12]}) differs from the planned input {plan.input} "
        f"(sha256 {plan.input_sha256[:12]}); --shards 3 differs from the planned 2; the record "
        "selection or samples per question differ from the plan. Use a new --run-dir, or the "
        "original settings."
    )
    for changed in (
        S.make_plan(plan.input, 2, samples=2),
        S.make_plan(plan.input, 2, selection={"start_index": 0}),
    ):
        with pytest.raises(S.PlanError, match=r": the record selection or samples per question"):
            S.check_plan(stage_dir, changed)
    assert S.check_plan(tmp_path / "elsewhere", plan) is None


# --------------------------------------------------------------------------- markers


def test_markers_completed_and_error_counts(tmp_path: Path) -> None:
    stage_dir, plan = _stage(tmp_path, 10, 5)
    assert S.completed(stage_dir) == set()
    S.write_marker(stage_dir, 0, {"records": 2, "errors": 2})
    S.write_marker(stage_dir, 1, {"records": 2, "errors": "3"})  # not a count: ignored
    S.write_marker(stage_dir, 2, {"records": 2, "errors": True})
    S.write_marker(stage_dir, 3, {"records": 2})  # an older marker: no errors field
    folder = stage_dir / "completions"
    (folder / ".00004.tmp").write_text("{}")
    (folder / "notes").write_text("x")
    assert S.completed(stage_dir) == {0, 1, 2, 3}
    assert S.incomplete(stage_dir, plan) == [4]
    assert S.marked_errors(stage_dir, plan) == 2
    assert S.read_marker(stage_dir, 3) == {"records": 2}
    assert S.read_marker(stage_dir, 4) == {}
    S.marker_path(stage_dir, 3).write_text("[1, 2]")
    S.marker_path(stage_dir, 2).write_text('{"records": 2,')
    assert S.read_marker(stage_dir, 3) == {} == S.read_marker(stage_dir, 2)


@pytest.mark.parametrize(
    "field", [("bytes", "155"), ("crc32", 1.0), ("records", True), ("slice", None)]
)
def test_a_marker_with_a_field_of_the_wrong_kind_is_never_trusted(
    tmp_path: Path, field: tuple[str, Any]
) -> None:
    stage_dir, plan = _stage(tmp_path, 6, 2)
    _complete_all(stage_dir, plan)
    marker = S.marker_path(stage_dir, 1)
    fields = json.loads(marker.read_text())
    fields[field[0]] = field[1]
    marker.write_text(json.dumps(fields))
    for keep in (None, _keep_all):
        with pytest.raises(S.PlanError) as err:
            S.write_merged(stage_dir, plan, [], keep=keep)
        assert str(err.value) == (
            f"{marker}: this marker was not written for this plan's shard 1 (another version "
            "or another input); remove it and relaunch the same command to redo the shard"
        )
    assert not (stage_dir / "merged.jsonl").exists()


def test_a_marker_counting_other_records_than_the_plan_is_refused(tmp_path: Path) -> None:
    stage_dir, plan = _stage(tmp_path, 6, 2, samples=2)
    _complete_all(stage_dir, plan)
    marker = S.marker_path(stage_dir, 1)
    fields = json.loads(marker.read_text())
    marker.write_text(json.dumps({**fields, "records": 3}))
    with pytest.raises(S.PlanError) as err:
        S.write_merged(stage_dir, plan, [])
    assert str(err.value) == f"{marker}: marks 3 records, the plan has 6"


@pytest.mark.parametrize(("shards", "more"), [(21, ""), (22, " and 1 more")])
def test_the_merge_lists_at_most_twenty_missing_shards(
    tmp_path: Path, shards: int, more: str
) -> None:
    stage_dir, plan = _stage(tmp_path, shards, shards)
    S.write_marker(stage_dir, 0, {"records": 1})
    names = ", ".join(f"{i:05d}" for i in range(1, 21))
    for keep in (None, _keep_all):
        with pytest.raises(S.PlanError) as err:
            S.write_merged(stage_dir, plan, [], keep=keep)
        assert str(err.value) == (
            f"{stage_dir}: cannot merge, {shards - 1} of {shards} shards are not complete "
            f"({names}{more}); relaunch the same command to run only these"
        )


# --------------------------------------------------------------------------- merge counts


def test_merge_counts_and_outputs_whole(tmp_path: Path) -> None:
    """Without ``keep`` every record is kept; with it, ``keep`` sees one question (its samples,
    in plan order) at a time, and records without a category count under "all"."""
    stage_dir, plan = _stage(tmp_path, 3, 2, samples=2)
    _complete_all(stage_dir, plan)
    outs = [tmp_path / "a" / "traces.jsonl", tmp_path / "b.jsonl"]
    every = _plan_bytes(plan, 0) + _plan_bytes(plan, 1)
    assert S.write_merged(stage_dir, plan, outs) == {
        "total": 6,
        "kept": 6,
        "errors": 0,
        "per_category": {},
    }
    assert [p.read_bytes() for p in outs] == [every, every]
    seen: list[list[tuple[str, int]]] = []

    def keep(recs: list[dict[str, Any]]) -> list[bool]:
        seen.append([S.record_key(r) for r in recs])
        return [r["id"] != "q001" and r["sample"] == 0 for r in recs]

    assert S.write_merged(stage_dir, plan, outs, keep=keep) == {
        "total": 6,
        "kept": 2,
        "errors": 0,
        "per_category": {"all": [2, 6]},
    }
    assert seen == [
        [("q000", 0), ("q000", 1)],
        [("q001", 0), ("q001", 1)],
        [("q002", 0), ("q002", 1)],
    ]
    kept = _line(_rec("q000")) + _line(_rec("q002"))
    assert [p.read_text() for p in [stage_dir / "merged.jsonl", *outs]] == [kept] * 3
