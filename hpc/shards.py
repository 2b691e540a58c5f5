"""Shard plans, completion markers, resumable shard files and the verified streaming merge.

Protocol (shared by ``generate`` and ``evaluate``):

* ``plan.json`` is written once per stage folder: the input's sha256, the shard count and each
  shard's record range. A relaunch with another input or shard count is refused.
* A task appends finished records to ``shards/00003.jsonl`` (one write + fsync per batch).
  On start it truncates a torn last line and skips the keys already there.
* When every assigned key is present, the shard is rewritten in plan order (atomically) and only
  then ``completions/00003`` is created. A marker therefore always means a complete shard.
* The merge streams the shards in plan order, checks every key once, and renames a fsync'd temp
  file into place. Memory stays constant whatever the size of the shards.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cot.records import RecordError, atomic_open, atomic_write_text, dumps, fsync_dir

Key = tuple[str, int]  # (record id, sample index)


class PlanError(ValueError):
    """The run folder holds a plan for another input or shard count, or shards are missing."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def shard_name(index: int) -> str:
    """Zero-padded shard name, e.g. ``00003``."""
    return f"{index:05d}"


@dataclass
class Plan:
    """Which records each shard owns; written once per stage folder."""

    input: str
    input_sha256: str
    num_records: int
    shards: int
    samples: int
    ranges: list[tuple[int, int]]
    ids: list[str]
    selection: dict[str, Any]

    def keys(self, shard: int) -> list[Key]:
        """The (id, sample) keys of a shard, in output order."""
        lo, hi = self.ranges[shard]
        return [(rid, s) for rid in self.ids[lo:hi] for s in range(self.samples)]

    def to_json(self) -> str:
        """Canonical JSON text."""
        return json.dumps(self.__dict__, indent=1)


def make_plan(
    input_path: str | Path,
    ids: list[str],
    shards: int,
    samples: int = 1,
    selection: dict[str, Any] | None = None,
) -> Plan:
    """Contiguous, balanced ranges: shard i owns records [i*n//N, (i+1)*n//N)."""
    n = len(ids)
    if shards > n:
        raise RecordError(
            input_path, None, f"{shards} shards for {n} records: use --shards {n} or fewer"
        )
    ranges = [(i * n // shards, (i + 1) * n // shards) for i in range(shards)]
    return Plan(
        input=str(input_path),
        input_sha256=sha256_file(input_path),
        num_records=n,
        shards=shards,
        samples=samples,
        ranges=ranges,
        ids=ids,
        selection=selection or {},
    )


def write_or_check_plan(stage_dir: Path, plan: Plan) -> Plan:
    """Write ``plan.json`` once; on relaunch refuse a different input, selection or shard count."""
    path = stage_dir / "plan.json"
    if path.exists():
        old = Plan(**json.loads(path.read_text(encoding="utf-8")))
        old.ranges = [tuple(r) for r in old.ranges]  # type: ignore[misc]
        problems = []
        if old.input_sha256 != plan.input_sha256:
            problems.append(
                f"input {plan.input} (sha256 {plan.input_sha256[:12]}) differs from the planned "
                f"input {old.input} (sha256 {old.input_sha256[:12]})"
            )
        if old.shards != plan.shards:
            problems.append(f"--shards {plan.shards} differs from the planned {old.shards}")
        if old.samples != plan.samples or old.selection != plan.selection:
            problems.append("the record selection or samples per question differ from the plan")
        if problems:
            raise PlanError(
                f"{path}: refusing to relaunch into this run folder: {'; '.join(problems)}. "
                "Use a new --run-dir, or the original settings."
            )
        return old
    stage_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, plan.to_json())
    return plan


def load_plan(stage_dir: Path) -> Plan:
    """Read a stage's plan."""
    path = stage_dir / "plan.json"
    if not path.exists():
        raise PlanError(f"{path}: no plan here; was the stage launched into this run folder?")
    plan = Plan(**json.loads(path.read_text(encoding="utf-8")))
    plan.ranges = [tuple(r) for r in plan.ranges]  # type: ignore[misc]
    return plan


def shard_path(stage_dir: Path, shard: int) -> Path:
    """``shards/00003.jsonl``."""
    return stage_dir / "shards" / f"{shard_name(shard)}.jsonl"


def marker_path(stage_dir: Path, shard: int) -> Path:
    """``completions/00003``."""
    return stage_dir / "completions" / shard_name(shard)


def completed(stage_dir: Path) -> set[int]:
    """Shards with a completion marker."""
    folder = stage_dir / "completions"
    if not folder.exists():
        return set()
    return {int(p.name) for p in folder.iterdir() if p.name.isdigit()}


def incomplete(stage_dir: Path, plan: Plan) -> list[int]:
    """Shards still to run, in order."""
    done = completed(stage_dir)
    return [i for i in range(plan.shards) if i not in done]


def record_key(rec: dict[str, Any]) -> Key:
    """(id, sample) of a record."""
    return str(rec["id"]), int(rec.get("sample", 0))


def recover_shard(path: Path) -> dict[Key, int]:
    """Truncate a torn last line, then return the keys already written (key -> line number).

    A line is torn when the writer died mid-write: it has no final newline, or is not valid
    JSON. Only the last line can be torn, because each batch is one append followed by fsync.
    """
    if not path.exists():
        return {}
    keys: dict[Key, int] = {}
    good_end = 0
    with open(path, "rb+") as fh:
        for lineno, raw in enumerate(iter(fh.readline, b""), start=1):
            if not raw.endswith(b"\n"):
                break
            try:
                rec = json.loads(raw)
                key = record_key(rec)
            except (ValueError, KeyError, TypeError):
                break
            keys.setdefault(key, lineno)
            good_end = fh.tell()
        size = fh.seek(0, os.SEEK_END)
        if size != good_end:
            fh.truncate(good_end)
            fh.flush()
            os.fsync(fh.fileno())
    return keys


def finish_shard(stage_dir: Path, plan: Plan, shard: int) -> int:
    """Check the shard holds every key, rewrite it in plan order, then write the marker.

    Returns the number of records. Raises PlanError when keys are missing (nothing is marked).
    """
    path = shard_path(stage_dir, shard)
    wanted = plan.keys(shard)
    by_key: dict[Key, str] = {}
    if path.exists():
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                by_key.setdefault(record_key(json.loads(line)), line)
    missing = [k for k in wanted if k not in by_key]
    if missing:
        raise PlanError(
            f"{path}: shard {shard} is missing {len(missing)} records, e.g. {missing[0]}"
        )
    with atomic_open(path) as out:
        for k in wanted:
            out.write(by_key[k])
    marker = marker_path(stage_dir, shard)
    marker.parent.mkdir(parents=True, exist_ok=True)
    with open(marker, "w") as fh:
        fh.write(json.dumps({"records": len(wanted)}))
        fh.flush()
        os.fsync(fh.fileno())
    fsync_dir(marker.parent)
    return len(wanted)


def iter_merged(stage_dir: Path, plan: Plan) -> Iterator[tuple[str, dict[str, Any]]]:
    """Stream (line, record) of every shard in plan order, checking each key once and in order.

    Raises:
        PlanError: listing shards without a marker, or naming a key out of place.
    """
    _check_markers(stage_dir, plan)
    for shard in range(plan.shards):
        expected = iter(plan.keys(shard))
        path = shard_path(stage_dir, shard)
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                rec = json.loads(line)
                key = record_key(rec)
                want = next(expected, None)
                if key != want:
                    raise PlanError(f"{path}:{lineno}: expected record {want}, found {key}")
                yield line, rec
        left = next(expected, None)
        if left is not None:
            raise PlanError(f"{path}: shard {shard} ends before record {left}")


def _check_markers(stage_dir: Path, plan: Plan) -> None:
    missing = incomplete(stage_dir, plan)
    if missing:
        names = ", ".join(shard_name(i) for i in missing[:20])
        more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise PlanError(
            f"{stage_dir}: cannot merge, {len(missing)} of {plan.shards} shards are not complete "
            f"({names}{more}); relaunch the same command to run only these"
        )


# Our writers put "id" first and "sample" (when present) second, so the keys of a whole block
# can be read with one regex whose literal prefix lets `re` skip through the bytes at C speed,
# and compared with the expected keys as one list. Blocks that don't fit (hand-edited shards,
# other key orders) fall back to json.loads line by line.
_KEY_RE = re.compile(rb'\n\{"id": "((?:[^"\\\n]|\\.)*)"(?:, "sample": (\d+))?')
_NEEDS_ESCAPE = re.compile(r'["\\\x00-\x1f]')
_BLOCK = 8 << 20


def _expected(key: Key) -> tuple[bytes, bytes]:
    rid = key[0]
    if _NEEDS_ESCAPE.search(rid):
        rid = json.dumps(rid, ensure_ascii=False)[1:-1]
    return rid.encode(), b"%d" % key[1]


def _expected_keys(plan: Plan, shard: int) -> list[tuple[bytes, bytes]]:
    lo, hi = plan.ranges[shard]
    ids = plan.ids[lo:hi]
    if _NEEDS_ESCAPE.search("".join(ids)):
        return [_expected(k) for k in plan.keys(shard)]
    raw = [i.encode() for i in ids]
    if plan.samples == 1:
        return list(zip(raw, itertools.repeat(b"0")))
    return [(i, b"%d" % s) for i in raw for s in range(plan.samples)]


def _block_keys(
    data: bytes, cut: int, lines: int, want: list[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    """Keys of the lines in ``data[1:cut]``; ``data[0]`` is a newline, so every line matches."""
    keys: list[tuple[bytes, bytes]] = _KEY_RE.findall(memoryview(data)[:cut])
    if len(keys) == lines:
        if keys == want:
            return keys
        keys = [(i, n or b"0") for i, n in keys]  # records without a "sample" key
        if keys == want:
            return keys
    return [_expected(record_key(json.loads(line))) for line in data[1:cut].splitlines()]


def _merge_fast(stage_dir: Path, plan: Plan, out: IO[bytes]) -> int:
    """Copy shards block by block, checking every key in order; returns the record count."""
    total = 0
    for shard in range(plan.shards):
        path = shard_path(stage_dir, shard)
        expected = _expected_keys(plan, shard)
        pos = 0
        with open(path, "rb") as fh:
            rest = b""
            while True:
                block = fh.read(_BLOCK)
                if not block:
                    if rest:
                        raise PlanError(f"{path}:{pos + 1}: torn last line in a complete shard")
                    break
                # One copy per block: a leading newline, the carried partial line, the block.
                data = b"\n" + rest + block
                cut = data.rfind(b"\n") + 1
                rest = data[cut:]
                lines = data.count(b"\n", 1, cut)
                want = expected[pos : pos + lines]
                keys = _block_keys(data, cut, lines, want)
                if keys != want:
                    n = next(
                        (k for k, (a, b) in enumerate(zip(keys, want, strict=False)) if a != b),
                        len(want),
                    )
                    wanted = plan.keys(shard)[pos + n] if pos + n < len(expected) else None
                    found = (keys[n][0].decode(errors="replace"), int(keys[n][1]))
                    raise PlanError(
                        f"{path}:{pos + n + 1}: expected record {wanted}, found {found}"
                    )
                out.write(memoryview(data)[1:cut])
                pos += len(keys)
        if pos != len(expected):
            raise PlanError(f"{path}: shard {shard} ends before record {plan.keys(shard)[pos]}")
        total += pos
    return total


def write_merged(
    stage_dir: Path,
    plan: Plan,
    outputs: Iterable[Path],
    keep: Any = None,
) -> dict[str, Any]:
    """Merge shards into ``stage_dir/merged.jsonl`` atomically and copy it to each output.

    Args:
        keep: optional predicate on a record; records it rejects are left out (and counted
            per category). Without it the merge copies verified blocks and never parses JSON.

    Returns:
        counts: total, kept, and kept/total per category (with ``keep``).
    """
    merged = stage_dir / "merged.jsonl"
    total = kept = 0
    per_cat: dict[str, list[int]] = {}
    if keep is None:
        _check_markers(stage_dir, plan)
        with atomic_open(merged, "wb") as out:
            total = kept = _merge_fast(stage_dir, plan, out)
    else:
        with atomic_open(merged) as out:
            for line, rec in iter_merged(stage_dir, plan):
                total += 1
                cat = per_cat.setdefault(str(rec.get("category", "all")), [0, 0])
                cat[1] += 1
                if keep(rec):
                    out.write(line)
                    kept += 1
                    cat[0] += 1
    for dest in outputs:
        _copy_atomic(merged, Path(dest))
    return {"total": total, "kept": kept, "per_category": per_cat}


def _copy_atomic(src: Path, dest: Path, chunk: int = 1 << 20) -> None:
    with open(src, "rb") as fin, atomic_open(dest, "wb") as fout:
        while block := fin.read(chunk):
            fout.write(block)


def append_attempt(stage_dir: Path, shard: int, info: dict[str, Any]) -> int:
    """Record one start of a shard task; returns how many starts there have been."""
    path = stage_dir / "attempts" / shard_name(shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(dumps(info) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    with open(path, encoding="utf-8") as fh:
        return sum(1 for _ in fh)
