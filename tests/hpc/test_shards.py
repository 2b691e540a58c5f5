"""Unit tests of hpc/shards.py: plans, resumable shard files, markers and the verified merge."""

from __future__ import annotations

import contextlib
import errno
import json
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cot.records import RecordError, dumps
from hpc import shards as S
from jobs.merge import Merge


def _input(tmp_path: Path, n: int, name: str = "q.jsonl") -> tuple[Path, list[str]]:
    path = tmp_path / name
    ids = [f"q{i:03d}" for i in range(n)]
    cats = ("algebra", "arithmetic", "word")
    path.write_text(
        "".join(
            json.dumps({"id": rid, "question": f"what is {i}?", "category": cats[i % 3]}) + "\n"
            for i, rid in enumerate(ids)
        )
    )
    return path, ids


def _rec(rid: str, sample: int = 0, **extra: Any) -> dict[str, Any]:
    return {"id": rid, "sample": sample, "cot": f"text of {rid}/{sample}", **extra}


def _line(rec: dict[str, Any]) -> str:
    return json.dumps(rec) + "\n"


def _stage(tmp_path: Path, n: int, shards: int, samples: int = 1) -> tuple[Path, S.Plan]:
    path, _ = _input(tmp_path, n)
    stage_dir = tmp_path / "run" / "generate"
    plan = S.write_or_check_plan(stage_dir, S.make_plan(path, shards, samples))
    return stage_dir, plan


def _ids(plan: S.Plan) -> list[str]:
    return [r["id"] for shard in range(plan.shards) for r in plan.records(shard)]


def _complete_all(stage_dir: Path, plan: S.Plan, **extra: Any) -> None:
    for shard in range(plan.shards):
        path = S.shard_path(stage_dir, shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(_line(_rec(rid, s, **extra)) for rid, s in plan.keys(shard)))
        S.finish_shard(stage_dir, plan, shard)


# --------------------------------------------------------------------------- plan


@pytest.mark.parametrize(("n", "shards"), [(10, 3), (48, 8), (7, 7), (100, 6), (5, 1)])
def test_plan_ranges_balanced_contiguous_and_complete(tmp_path: Path, n: int, shards: int) -> None:
    path, ids = _input(tmp_path, n)
    plan = S.make_plan(path, shards)
    assert len(plan.ranges) == shards
    assert plan.ranges[0][0] == 0 and plan.ranges[-1][1] == n
    for (_, hi), (lo, _) in zip(plan.ranges, plan.ranges[1:], strict=False):
        assert hi == lo  # contiguous, no gap, no overlap
    sizes = [hi - lo for lo, hi in plan.ranges]
    assert max(sizes) - min(sizes) <= 1
    assert min(sizes) >= 1
    all_keys = [k for i in range(shards) for k in plan.keys(i)]
    assert all_keys == [(rid, 0) for rid in ids]


def test_plan_is_deterministic_and_pins_the_input(tmp_path: Path) -> None:
    path, ids = _input(tmp_path, 20)
    a = S.make_plan(path, 6, samples=2, selection={"start_index": 0})
    b = S.make_plan(path, 6, samples=2, selection={"start_index": 0})
    assert a.to_json() == b.to_json()
    assert a.input_sha256 == S.sha256_file(path)
    assert a.keys(0) == [
        (ids[0], 0),
        (ids[0], 1),
        (ids[1], 0),
        (ids[1], 1),
        (ids[2], 0),
        (ids[2], 1),
    ]


def test_plan_more_shards_than_records_names_the_file(tmp_path: Path) -> None:
    path, _ = _input(tmp_path, 3)
    with pytest.raises(RecordError, match=r"q\.jsonl.*4 shards for 3 records"):
        S.make_plan(path, 4)


def test_plan_written_once_and_relaunch_checked(tmp_path: Path) -> None:
    stage_dir, plan = _stage(tmp_path, 12, 3)
    text = (stage_dir / "plan.json").read_text()
    again = S.write_or_check_plan(stage_dir, S.make_plan(plan.input, 3))
    assert again.ranges == plan.ranges
    assert (stage_dir / "plan.json").read_text() == text
    with pytest.raises(S.PlanError, match=r"--shards 4 differs from the planned 3"):
        S.write_or_check_plan(stage_dir, S.make_plan(plan.input, 4))
    other, _ = _input(tmp_path, 12, "other.jsonl")
    other.write_text(other.read_text() + "\n")  # same records, other bytes
    with pytest.raises(S.PlanError, match=r"other\.jsonl.*differs from the planned input"):
        S.write_or_check_plan(stage_dir, S.make_plan(other, 3))
    assert (stage_dir / "plan.json").read_text() == text
    assert S.load_plan(stage_dir).ranges == plan.ranges


# --------------------------------------------------------------------------- recover


def test_recover_truncates_torn_last_line_and_returns_keys(tmp_path: Path) -> None:
    path = tmp_path / "00000.jsonl"
    good = _line(_rec("a")) + _line(_rec("b")) + _line(_rec("b", 1))
    path.write_text(good + '{"id": "c", "sample": 0, "cot": "half')
    keys = S.recover_shard(path)
    assert keys == {("a", 0): 1, ("b", 0): 2, ("b", 1): 3}
    assert path.read_text() == good
    # Idempotent, and appending after recovery yields valid JSONL.
    assert S.recover_shard(path) == keys
    with open(path, "a") as fh:
        fh.write(_line(_rec("c")))
    assert ("c", 0) in S.recover_shard(path)


def test_recover_drops_an_unparsable_last_line_with_newline(tmp_path: Path) -> None:
    path = tmp_path / "00000.jsonl"
    good = _line(_rec("a"))
    path.write_text(good + '{"id": "b", "cot\n')
    assert S.recover_shard(path) == {("a", 0): 1}
    assert path.read_text() == good


def test_recover_missing_and_empty_files(tmp_path: Path) -> None:
    assert S.recover_shard(tmp_path / "absent.jsonl") == {}
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert S.recover_shard(empty) == {}
    torn_only = tmp_path / "torn.jsonl"
    torn_only.write_text('{"id": "a"')
    assert S.recover_shard(torn_only) == {}
    assert torn_only.read_bytes() == b""


# --------------------------------------------------------------------------- finish


def test_finish_refuses_incomplete_shard_and_writes_no_marker(tmp_path: Path) -> None:
    stage_dir, plan = _stage(tmp_path, 9, 3)
    path = S.shard_path(stage_dir, 1)
    path.parent.mkdir(parents=True)
    keys = plan.keys(1)
    path.write_text(_line(_rec(keys[0][0])) + _line(_rec(keys[2][0])))
    before = path.read_text()
    with pytest.raises(S.PlanError, match=rf"shard 1 is missing 1 records.*{keys[1][0]}"):
        S.finish_shard(stage_dir, plan, 1)
    assert not S.marker_path(stage_dir, 1).exists()
    assert S.completed(stage_dir) == set()
    assert path.read_text() == before
    with pytest.raises(S.PlanError, match="missing 3 records"):
        S.finish_shard(stage_dir, plan, 2)  # no shard file at all


def test_finish_refuses_a_whole_last_line_without_newline(tmp_path: Path) -> None:
    stage_dir, plan = _stage(tmp_path, 4, 2)
    path = S.shard_path(stage_dir, 1)
    path.parent.mkdir(parents=True)
    text = "".join(_line(_rec(rid, s)) for rid, s in plan.keys(1)).rstrip("\n")
    path.write_text(text)  # every record there, the last one valid JSON, but no final newline
    with pytest.raises(S.PlanError, match=rf"{path}:2: last line has no newline"):
        S.finish_shard(stage_dir, plan, 1)
    assert not S.marker_path(stage_dir, 1).exists() and path.read_text() == text


def test_a_second_finish_of_a_marked_shard_is_refused(tmp_path: Path) -> None:
    stage_dir, plan = _stage(tmp_path, 4, 2)
    path = S.shard_path(stage_dir, 0)
    path.parent.mkdir(parents=True)
    path.write_text("".join(_line(_rec(rid, s)) for rid, s in plan.keys(0)))
    assert S.finish_shard(stage_dir, plan, 0) == 2
    marker = S.marker_path(stage_dir, 0).read_bytes()
    with pytest.raises(S.PlanError, match="already marked complete"):
        S.finish_shard(stage_dir, plan, 0)  # a second writer of the same shard
    assert S.marker_path(stage_dir, 0).read_bytes() == marker


def test_finish_reorders_drops_duplicates_then_marks(tmp_path: Path) -> None:
    stage_dir, plan = _stage(tmp_path, 8, 2, samples=2)
    keys = plan.keys(1)
    # Resumed shards come out of order (length-grouped), with a re-done batch duplicated.
    shuffled = [*reversed(keys[2:]), keys[0], keys[2], keys[1], keys[0], keys[3]]
    path = S.shard_path(stage_dir, 1)
    path.parent.mkdir(parents=True)
    path.write_text("".join(_line(_rec(rid, s)) for rid, s in shuffled))
    assert S.finish_shard(stage_dir, plan, 1) == len(keys)
    lines = path.read_text().splitlines()
    assert [S.record_key(json.loads(x)) for x in lines] == keys
    assert S.marker_path(stage_dir, 1).exists()
    data = path.read_bytes()
    assert json.loads(S.marker_path(stage_dir, 1).read_text()) == {
        "records": len(keys),
        "errors": 0,
        "bytes": len(data),
        "crc32": zlib.crc32(data),
        "slice": plan.digest(1),
    }
    assert S.completed(stage_dir) == {1}
    assert S.incomplete(stage_dir, plan) == [0]


# --------------------------------------------------------------------------- merge


def test_merge_refuses_with_missing_shards_listing_them(tmp_path: Path) -> None:
    stage_dir, plan = _stage(tmp_path, 12, 4)
    _complete_all(stage_dir, plan)
    S.marker_path(stage_dir, 1).unlink()
    S.marker_path(stage_dir, 3).unlink()
    with pytest.raises(S.PlanError, match=r"2 of 4 shards are not complete \(00001, 00003\)"):
        S.write_merged(stage_dir, plan, [])
    assert not (stage_dir / "merged.jsonl").exists()


def test_merge_streams_in_plan_order(tmp_path: Path) -> None:
    stage_dir, plan = _stage(tmp_path, 10, 3, samples=2)
    _complete_all(stage_dir, plan)
    out = tmp_path / "out" / "merged copy.jsonl"
    counts = S.write_merged(stage_dir, plan, [out])
    assert counts["total"] == counts["kept"] == 20
    merged = (stage_dir / "merged.jsonl").read_bytes()
    assert out.read_bytes() == merged
    keys = [S.record_key(json.loads(x)) for x in merged.decode().splitlines()]
    assert keys == [(rid, s) for rid in _ids(plan) for s in range(2)]


@pytest.mark.parametrize("fault", ["duplicate", "out_of_order", "short", "foreign"])
def test_merge_checks_every_key(tmp_path: Path, fault: str) -> None:
    stage_dir, plan = _stage(tmp_path, 9, 3)
    _complete_all(stage_dir, plan)
    path = S.shard_path(stage_dir, 1)
    lines = path.read_text().splitlines(keepends=True)
    if fault == "duplicate":
        lines[1] = lines[0]
    elif fault == "out_of_order":
        lines[0], lines[1] = lines[1], lines[0]
    elif fault == "short":
        lines = lines[:-1]
    else:
        lines[2] = _line(_rec("not-in-plan"))
    path.write_text("".join(lines))
    with pytest.raises(S.PlanError, match=r"00001\.jsonl"):
        S.write_merged(stage_dir, plan, [])


@pytest.mark.parametrize("style", ["id_first", "sample_first", "ascii_escaped", "no_sample"])
def test_merge_any_key_order_and_odd_ids(tmp_path: Path, style: str) -> None:
    ids = ["plain", 'quo"te', "back\\slash", "uni-é", "tab\tid", "L7"]
    src = tmp_path / "q.jsonl"
    src.write_text("".join(json.dumps({"id": i, "question": "?"}) + "\n" for i in ids))
    stage_dir = tmp_path / "run" / "generate"
    plan = S.write_or_check_plan(stage_dir, S.make_plan(src, 2))

    def line(rid: str) -> str:
        if style == "sample_first":
            rec: dict[str, Any] = {"sample": 0, "id": rid, "cot": "x"}
        elif style == "no_sample":
            rec = {"id": rid, "cot": "x"}
        else:
            rec = {"id": rid, "sample": 0, "cot": "x"}
        return json.dumps(rec, ensure_ascii=style == "ascii_escaped") + "\n"

    for shard in range(2):
        path = S.shard_path(stage_dir, shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(line(rid) for rid, _ in plan.keys(shard)), encoding="utf-8")
        S.finish_shard(stage_dir, plan, shard)
    counts = S.write_merged(stage_dir, plan, [])
    assert counts["total"] == len(ids)
    merged = (stage_dir / "merged.jsonl").read_text(encoding="utf-8")
    assert merged == "".join(line(rid) for rid in ids)
    # Swap two records of shard 1: caught whatever the spelling.
    path = S.shard_path(stage_dir, 1)
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text(lines[1] + lines[0] + lines[2], encoding="utf-8")
    with pytest.raises(S.PlanError, match=r"00001\.jsonl: changed after it was marked"):
        S.write_merged(stage_dir, plan, [])


@pytest.mark.parametrize("block", [100, 16])
def test_merge_across_block_boundaries_and_fast_path_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: int
) -> None:
    stage_dir, plan = _stage(tmp_path, 40, 3, samples=2)
    for shard in range(plan.shards):
        path = S.shard_path(stage_dir, shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(dumps(_rec(rid, s)) + "\n" for rid, s in plan.keys(shard)))
        S.finish_shard(stage_dir, plan, shard)
    expected = b"".join(S.shard_path(stage_dir, i).read_bytes() for i in range(plan.shards))
    # Lines of ~40 bytes straddle 100-byte blocks; at 16 bytes every line spans several blocks.
    monkeypatch.setattr(S, "_BLOCK", block)
    parsed: list[int] = []
    real_parsed = S._parsed

    def spy(*args: Any) -> Any:
        parsed.append(1)
        return real_parsed(*args)

    monkeypatch.setattr(S, "_parsed", spy)
    assert S.write_merged(stage_dir, plan, [])["total"] == 80
    assert (stage_dir / "merged.jsonl").read_bytes() == expected
    assert parsed == []  # the marker's checksum seals the shard: no line is parsed
    # A swap deep inside shard 2, after it was marked: caught and the shard named.
    path = S.shard_path(stage_dir, 2)
    lines = path.read_text().splitlines(keepends=True)
    lines[20], lines[21] = lines[21], lines[20]
    path.write_text("".join(lines))
    with pytest.raises(S.PlanError, match=r"00002\.jsonl: changed after it was marked complete"):
        S.write_merged(stage_dir, plan, [])
    assert (stage_dir / "merged.jsonl").read_bytes() == expected
    # An unparsable line is named too, and the torn end of a marked shard is refused.
    lines[20], lines[21] = lines[21], lines[20]
    path.write_text("".join(lines[:5]) + "{not json\n" + "".join(lines[6:]))
    with pytest.raises(S.PlanError, match=r"00002\.jsonl:6: not a valid JSON record"):
        S.write_merged(stage_dir, plan, [])
    path.write_text("".join(lines)[:-1])
    with pytest.raises(S.PlanError, match=r"00002\.jsonl: changed after it was marked"):
        S.write_merged(stage_dir, plan, [])


@pytest.mark.parametrize("fail_at", ["third", "last"])
def test_merge_write_error_surfaces_and_keeps_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: str
) -> None:
    """A full disk during the merge's background write, mid-way or on the very last block: the
    error reaches the caller, the temp file is removed and earlier outputs are left intact."""
    stage_dir, plan = _stage(tmp_path, 30, 3)
    _complete_all(stage_dir, plan)
    (stage_dir / "merged.jsonl").write_text("OLD MERGE\n")
    out = tmp_path / "final.jsonl"
    out.write_text("KEEP ME\n")
    monkeypatch.setattr(S, "_BLOCK", 200)
    real_open = S.atomic_open

    # One write per 200-byte read; the last one is the end of the last shard.
    writes = sum(-(-S.shard_path(stage_dir, i).stat().st_size // 200) for i in range(3))
    assert writes > 5

    class FullDisk:
        def __init__(self, fh: Any) -> None:
            self.fh, self.calls = fh, 0

        def write(self, data: Any) -> int:
            self.calls += 1
            if self.calls == (3 if fail_at == "third" else writes):
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.fh.write(data)  # type: ignore[no-any-return]

        def __getattr__(self, name: str) -> Any:
            return getattr(self.fh, name)

    @contextlib.contextmanager
    def full_disk(path: Path, mode: str = "w") -> Iterator[Any]:
        with real_open(path, mode) as fh:
            yield FullDisk(fh)

    monkeypatch.setattr(S, "atomic_open", full_disk)
    with pytest.raises(OSError, match="No space left"):
        S.write_merged(stage_dir, plan, [out])
    assert (stage_dir / "merged.jsonl").read_text() == "OLD MERGE\n"
    assert out.read_text() == "KEEP ME\n"
    assert [p.name for p in stage_dir.iterdir() if p.suffix == ".tmp"] == []
    assert not [t for t in threading.enumerate() if t.name == "merge-writer"]


def test_merge_failure_leaves_existing_outputs_intact(tmp_path: Path) -> None:
    stage_dir, plan = _stage(tmp_path, 9, 3)
    _complete_all(stage_dir, plan)
    out = tmp_path / "final.jsonl"
    out.write_text("KEEP ME\n")
    (stage_dir / "merged.jsonl").write_text("OLD MERGE\n")
    # Break the LAST shard, so the merge has already streamed most records when it fails.
    path = S.shard_path(stage_dir, 2)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[1] + lines[0] + lines[2])
    with pytest.raises(S.PlanError, match=r"00002\.jsonl: changed after it was marked"):
        S.write_merged(stage_dir, plan, [out])
    assert out.read_text() == "KEEP ME\n"
    assert (stage_dir / "merged.jsonl").read_text() == "OLD MERGE\n"
    leftovers = [p.name for d in (tmp_path, stage_dir) for p in d.iterdir() if p.suffix == ".tmp"]
    assert leftovers == []


def test_keep_correct_keeps_only_correct_and_counts_per_category(tmp_path: Path) -> None:
    stage_dir, plan = _stage(tmp_path, 12, 3)
    cats = {rid: ("algebra", "arithmetic", "word")[i % 3] for i, rid in enumerate(_ids(plan))}
    correct = {rid: i % 2 == 0 for i, rid in enumerate(_ids(plan))}
    for shard in range(plan.shards):
        path = S.shard_path(stage_dir, shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            "".join(
                _line(_rec(rid, s, category=cats[rid], correct=correct[rid]))
                for rid, s in plan.keys(shard)
            )
        )
        S.finish_shard(stage_dir, plan, shard)
    run_dir = stage_dir.parent
    out = tmp_path / "kept.jsonl"
    counts = Merge()(str(run_dir), "generate", [str(out)], "correct")
    kept = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in kept] == [rid for rid in _ids(plan) if correct[rid]]
    assert all(r["correct"] is True for r in kept)
    assert counts["total"] == 12 and counts["kept"] == 6
    expected: dict[str, list[int]] = {}
    for rid in _ids(plan):
        c = expected.setdefault(cats[rid], [0, 0])
        c[0] += int(correct[rid])
        c[1] += 1
    assert counts["per_category"] == expected
    assert json.loads((stage_dir / "merge.json").read_text())["kept"] == 6
    everything = Merge()(str(run_dir), "generate", [str(out)], "all")
    assert everything["kept"] == 12
    assert len(out.read_text().splitlines()) == 12


def test_keep_majority_keeps_the_majority_traces_and_reports_votes(tmp_path: Path) -> None:
    # 4 questions x 4 samples over 2 shards; no gold anywhere: majority needs none.
    answers = {
        0: ["12", "12.0", "7", None],  # 12 wins 2-1 ("12.0" votes with "12")
        1: ["3", "4", "4", "3"],  # a 2-2 tie: the answer of sample 0 wins
        2: [None, None, None, None],  # no answer: nothing kept
        3: ["5", "5", "5", "5"],  # unanimous
    }
    stage_dir, plan = _stage(tmp_path, 4, 2, samples=4)
    index = {rid: i for i, rid in enumerate(_ids(plan))}
    for shard in range(plan.shards):
        path = S.shard_path(stage_dir, shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            "".join(
                _line(_rec(rid, s, category="c", teacher_answer=answers[index[rid]][s]))
                for rid, s in plan.keys(shard)
            )
        )
        S.finish_shard(stage_dir, plan, shard)
    out = tmp_path / "voted.jsonl"
    counts = Merge()(str(stage_dir.parent), "generate", [str(out)], "majority")
    kept = [(index[r["id"]], r["sample"]) for r in map(json.loads, out.read_text().splitlines())]
    assert kept == [(0, 0), (0, 1), (1, 0), (1, 3), (3, 0), (3, 1), (3, 2), (3, 3)]
    assert counts["majority"] == {
        "questions": 4, "ties": 1, "no_answer": 1, "unanimous": 1, "agreement": 8 / 16
    }  # fmt: skip
    assert counts["per_category"] == {"c": [8, 16]}
    summary = json.loads((stage_dir / "merge.json").read_text())
    assert summary["keep"] == "majority" and summary["majority"]["ties"] == 1
    from hpc.stages import describe

    text = describe(summary)
    assert "kept      8 of     16" in text
    assert "majority vote over 4 questions: 50.0% of samples agree" in text and "1 ties" in text


def test_append_attempt_counts_starts(tmp_path: Path) -> None:
    stage_dir = tmp_path / "generate"
    assert S.append_attempt(stage_dir, 3, {"event": "start"}) == 1
    assert S.append_attempt(stage_dir, 3, {"event": "batch", "n": 2}) == 2
    lines = (stage_dir / "attempts" / "00003").read_text().splitlines()
    assert [json.loads(x)["event"] for x in lines] == ["start", "batch"]


def test_error_records_are_counted_in_the_marker_and_the_merge(tmp_path: Path) -> None:
    stage_dir, plan = _stage(tmp_path, 6, 2)
    for shard in (0, 1):
        path = S.shard_path(stage_dir, shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        recs = [_rec(rid, s) for rid, s in plan.keys(shard)]
        if shard == 1:  # one refused prompt, written twice (a redone request): counted once
            recs[0] = {**recs[0], "error": "prompt too long"}
            recs.append(recs[0])
        path.write_text("".join(_line(r) for r in recs))
        S.finish_shard(stage_dir, plan, shard)
    marker = json.loads(S.marker_path(stage_dir, 1).read_text())
    assert (marker["records"], marker["errors"]) == (3, 1)
    counts = S.write_merged(stage_dir, plan, [])
    assert (counts["total"], counts["errors"]) == (6, 1)


# ------------------------------------------------------------- a shard changed after its marker


@pytest.mark.parametrize(
    "fault",
    ["garbage_tail", "same_length_edit", "appended_line", "truncated_line", "reordered_bytes"],
)
def test_merge_refuses_a_shard_changed_after_its_marker(tmp_path: Path, fault: str) -> None:
    """The fast merge checks only where each line starts; the marker's byte count and crc32
    (taken when the shard was finished) catch a change anywhere else, named by file and line."""
    stage_dir, plan = _stage(tmp_path, 9, 3)
    for shard in range(plan.shards):
        path = S.shard_path(stage_dir, shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(dumps(_rec(rid, s)) + "\n" for rid, s in plan.keys(shard)))
        S.finish_shard(stage_dir, plan, shard)
    path = S.shard_path(stage_dir, 1)
    lines = path.read_bytes().splitlines(keepends=True)
    rid = plan.keys(1)[1][0]
    if fault == "garbage_tail":  # the example: the key is right, the rest is not JSON
        lines[1] = b'{"id": "%s", "sample": 0, GARBAGE\n' % rid.encode()
        where = r"00001\.jsonl:2: not a valid JSON record"
    elif fault == "same_length_edit":  # valid JSON, same size: only the checksum sees it
        lines[1] = lines[1].replace(b"text of", b"TEXT OF")
        where = r"00001\.jsonl: changed after it was marked complete"
    elif fault == "appended_line":
        lines.append(lines[-1])
        where = r"00001\.jsonl"
    elif fault == "truncated_line":
        lines[2] = lines[2][:-5] + b"\n"
        where = r"00001\.jsonl:3: not a valid JSON record"
    else:
        lines[0] = lines[0].replace(b"text of", b"etxt of")  # two bytes swapped
        where = r"00001\.jsonl: changed after it was marked complete"
    path.write_bytes(b"".join(lines))
    (stage_dir / "merged.jsonl").write_text("old\n")
    with pytest.raises(S.PlanError, match=where):
        S.write_merged(stage_dir, plan, [])
    assert (stage_dir / "merged.jsonl").read_text() == "old\n"  # nothing replaced


@pytest.mark.parametrize("marker", ["older", "other_plan"])
def test_merge_refuses_a_marker_not_written_for_this_plan(tmp_path: Path, marker: str) -> None:
    """A marker without the checksum and slice fields (an older version), or sealed against
    another plan's slice, is never trusted: the merge names it and writes nothing."""
    stage_dir, plan = _stage(tmp_path, 6, 2)
    _complete_all(stage_dir, plan)
    path = S.marker_path(stage_dir, 1)
    fields = json.loads(path.read_text())
    if marker == "older":
        fields = {"records": 3, "errors": 0}
    else:
        fields["slice"] = plan.digest(0)
    path.write_text(json.dumps(fields))
    for keep in (None, lambda recs: [True] * len(recs)):
        with pytest.raises(S.PlanError, match=r"completions/00001: this marker was not written"):
            S.write_merged(stage_dir, plan, [], keep=keep)
    assert not (stage_dir / "merged.jsonl").exists()
