"""Question sources at scale: a JSONL file, a Parquet file, or a folder of either.

A launch over millions of questions streams the input once (:func:`scan_questions`): every
record is validated as :func:`cot.records.read_questions` validates it (the same errors, naming
the file, the line or row, and the field) and only 16 bytes per record are kept: where it
starts in its file and an 8-byte hash of its id. The plan then cuts the selected records into
shards and records, per shard, the pieces of files it covers. A task reads only those pieces
(:func:`read_pieces`) and checks them against the digest the launch recorded.

Record ids are an ``id`` field or column, else a stable name: ``L<line>`` for a single JSONL
file (as ``read_questions`` names them), ``<file>:L<line>`` for a JSONL file in a folder and
``<file>:<row>`` for Parquet (rows count from 1, like lines). Parquet nulls count as absent.
"""

from __future__ import annotations

import hashlib
import json
import sys
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cot.records import RecordError, duplicate_id, iter_jsonl, none_selected, parse_line, question

__all__ = [
    "QuestionIndex",
    "Source",
    "id_hash",
    "ids_digest",
    "list_sources",
    "piece_digests",
    "read_pieces",
    "scan_questions",
    "slice_digest",
]

_BLOCK = 4 << 20
SMALL = 100_000  # inputs up to this many records check their ids with a set
_ROWS = 65_536  # Parquet rows converted to Python at a time
_TASK_ROWS = 4_096  # Parquet rows a task decodes at a time
PARQUET_SUFFIXES = (".parquet", ".pq")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


def id_hash(rid: str) -> bytes:
    """The 8 bytes a record id stands for in digests and the duplicate check."""
    return hashlib.blake2b(rid.encode("utf-8", "surrogatepass"), digest_size=8).digest()


def ids_digest(ids: Iterable[str]) -> str:
    """A digest of ids in order: the same from the launch's scan and from a task's pieces."""
    h = hashlib.sha256()
    for rid in ids:
        h.update(id_hash(rid))
    return h.hexdigest()[:32]


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Source:
    """One file of an input: ``label`` is its path relative to the input folder ("" when the
    input is this file) and ``kind`` is ``jsonl`` or ``parquet``."""

    path: Path
    label: str
    kind: str

    def default_id(self, n: int) -> str:
        """The id of record ``n`` (line or row) when it has none."""
        if self.kind == "parquet":
            return f"{self.label or self.path.name}:{n}"
        return f"{self.label}:L{n}" if self.label else f"L{n}"


def _kind(path: Path) -> str:
    return "parquet" if path.suffix.lower() in PARQUET_SUFFIXES else "jsonl"


def list_sources(input_path: str | Path) -> list[Source]:
    """The files of an input, in a stable order: the file itself, or every JSONL and Parquet
    file under a folder, sorted by relative path (hidden files and folders skipped)."""
    root = Path(input_path)
    if root.is_dir():
        files = sorted(
            p
            for p in root.rglob("*")
            if p.is_file()
            and p.suffix.lower() in PARQUET_SUFFIXES + JSONL_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        if not files:
            raise RecordError(root, None, "folder holds no .jsonl or .parquet file")
        for p in files:
            try:
                p.relative_to(root).as_posix().encode("utf-8")
            except UnicodeEncodeError:
                raise RecordError(p, None, "file name is not valid UTF-8; rename it") from None
        return [Source(p, p.relative_to(root).as_posix(), _kind(p)) for p in files]
    if not root.exists():
        raise RecordError(root, None, "file not found")
    return [Source(root, "", _kind(root))]


def source_of(input_path: str | Path, label: str, kind: str) -> Source:
    """The file ``label`` of an input (the input itself when ``label`` is "")."""
    root = Path(input_path)
    return Source(root / label if label else root, label, kind)


# --------------------------------------------------------------------------- rows


def _parquet_file(path: Path) -> Any:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid and friends
        raise RecordError(path, None, f"not a readable Parquet file ({err})"[:300]) from None


_JSON_TYPES = (str, int, float, bool, list, dict)


def _row(obj: dict[str, Any]) -> dict[str, Any]:
    """A Parquet row as a record: nulls dropped, values JSON cannot hold (dates, decimals,
    bytes), at any depth of a list or struct column, given as text."""
    return {k: _jsonable(v) for k, v in obj.items() if v is not None}


def _jsonable(v: Any) -> Any:
    if isinstance(v, (list, dict)):
        return json.loads(json.dumps(v, default=str))
    return v if isinstance(v, _JSON_TYPES) else str(v)


class _Groups:
    """Row groups of Parquet files, the last one read kept: consecutive pieces of one file
    (a launch hashing 10,000 slices in order) decode each group once, not once per piece."""

    def __init__(self) -> None:
        self._files: dict[Path, Any] = {}
        self._last: tuple[Path, int, Any] | None = None

    def file(self, path: Path) -> Any:
        if path not in self._files:
            self._files = {path: _parquet_file(path)}  # one file open at a time
        return self._files[path]

    def group(self, path: Path, g: int) -> Any:
        if self._last is None or self._last[:2] != (path, g):
            self._last = (path, g, self.file(path).read_row_group(g))
        return self._last[2]


def _parquet_rows(
    path: Path, lo: int = 0, hi: int | None = None, groups: _Groups | None = None
) -> Iterator[dict[str, Any]]:
    """Rows ``[lo, hi)`` of a Parquet file (nulls dropped), reading only the row groups that
    hold them. With ``groups`` (a launch hashing every slice in order) each group is decoded
    once and kept; without (a task) a group is streamed in batches of ``_TASK_ROWS``, so a
    task's memory is a batch, not a group."""
    pf = groups.file(path) if groups else _parquet_file(path)
    meta = pf.metadata
    hi = meta.num_rows if hi is None else hi
    first = 0
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        if first + n > lo and first < hi:
            a, b = max(lo, first) - first, min(hi, first + n) - first
            if groups is not None:
                batches = groups.group(path, g).slice(a, b - a).to_batches(max_chunksize=_ROWS)
            else:
                batches = _batches_of(pf, g, a, b)
            for batch in batches:
                yield from map(_row, batch.to_pylist())
        first += n
        if first >= hi:
            break


def _batches_of(pf: Any, group: int, a: int, b: int) -> Iterator[Any]:
    """Rows ``[a, b)`` of one row group, streamed (the rows before ``a`` are decoded, not kept)."""
    at = 0
    for batch in pf.iter_batches(batch_size=_TASK_ROWS, row_groups=[group]):
        lo, hi = max(a, at), min(b, at + batch.num_rows)
        if lo < hi:
            yield batch.slice(lo - at, hi - lo)
        at += batch.num_rows
        if at >= b:
            return


def _canonical(rec: dict[str, Any]) -> bytes:
    """The bytes a Parquet row stands for in a piece's digest."""
    return json.dumps(rec, sort_keys=True, ensure_ascii=False, default=str).encode() + b"\n"


# --------------------------------------------------------------------------- scan


@dataclass
class QuestionIndex:
    """What one streaming pass over an input learns (:func:`scan_questions`).

    For selected record k, ``starts[k]`` is where it starts in its file: the byte offset of its
    line (JSONL) or its row index (Parquet). ``files[i]`` holds, per file, its source, sha256,
    how many selected records it has, and where its selection begins (line or row) and ends
    (byte or row). ``id_hashes`` holds 8 bytes per record of the whole input, in order, until
    ``check_unique`` sorts them.
    """

    input: str
    files: list[dict[str, Any]]
    total: int
    first: int
    starts: Any = field(default_factory=lambda: array("q"))
    id_hashes: bytearray = field(default_factory=bytearray)
    has_answer: bool = False
    text_field: str = "question"
    _sorted: bool = False

    @property
    def count(self) -> int:
        """Selected records."""
        return len(self.starts)

    @property
    def sha256(self) -> str:
        """The input's digest: the file's sha256, or for a folder one over (name, sha256)."""
        if len(self.files) == 1 and not self.files[0]["source"].label:
            return str(self.files[0]["sha256"])
        h = hashlib.sha256()
        for f in self.files:
            h.update(f"{f['source'].label}\0{f['sha256']}\n".encode())
        return h.hexdigest()

    def ids_digest(self, lo: int, hi: int) -> str:
        """``ids_digest`` of selected records ``[lo, hi)``, from their id hashes."""
        if self._sorted:
            raise RuntimeError("ids_digest after check_unique: the id hashes are sorted")
        a, b = 8 * (self.first + lo), 8 * (self.first + hi)
        return hashlib.sha256(memoryview(self.id_hashes)[a:b]).hexdigest()[:32]

    def check_unique(self) -> None:
        """Refuse duplicate ids with read_questions' error (the first repeat in input order).

        Up to ``SMALL`` records, a set of the hashes (numpy's import alone would cost a small
        launch 90 ms); above, numpy sorts them in place (no copy: 8 bytes per record). On a
        repeat, the ids of the colliding hashes are read again to tell a duplicate from a hash
        collision.
        """
        self._sorted = True
        n = len(self.id_hashes) // 8
        if n < 2:
            return
        if n <= SMALL:
            hashes = array("Q")
            hashes.frombytes(bytes(self.id_hashes))
            if len(set(hashes)) == n:
                return
            counts: dict[int, int] = {}
            for x in hashes:
                counts[x] = counts.get(x, 0) + 1
            repeats: Any = [x for x, c in counts.items() if c > 1]
        else:
            import numpy as np

            arr = np.frombuffer(self.id_hashes, dtype="<u8")
            arr.sort()
            repeats = arr[1:][arr[1:] == arr[:-1]]
            if not len(repeats):
                return
        suspects = {int(x).to_bytes(8, sys.byteorder if n <= SMALL else "little") for x in repeats}
        seen: dict[str, str] = {}
        for f in self.files:
            src: Source = f["source"]
            unit = "row" if src.kind == "parquet" else "line"
            for n, rec in _records(src, self.text_field):
                rid = rec["id"]
                if id_hash(rid) in suspects:
                    if rid in seen:
                        raise RecordError(src.path, n, duplicate_id(rid, seen[rid]), "id")
                    seen[rid] = f"{unit} {n}" if len(self.files) == 1 else f"{src.path}:{n}"

    def pieces(self, lo: int, hi: int) -> list[list[Any]]:
        """Selected records ``[lo, hi)`` as pieces ``[file, start, end, first]``: a byte range
        and the line it starts on (JSONL), or a row range (Parquet, ``first`` = ``start``)."""
        out: list[list[Any]] = []
        base = 0
        for i, f in enumerate(self.files):
            n = f["selected"]
            a, b = max(lo, base), min(hi, base + n)
            if a < b:
                start = self.starts[a]
                if f["source"].kind == "parquet":
                    out.append([i, start, self.starts[b - 1] + 1, start])
                else:
                    end = self.starts[b] if b < base + n else f["end"]
                    out.append([i, start, end, None])  # the line: piece_digests counts it
            base += n
        return out


def _records(src: Source, text_field: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line or row, validated record) of one file, ids given."""
    if src.kind == "parquet":
        for n, obj in enumerate(_parquet_rows(src.path), start=1):
            yield n, _question(src, n, obj, text_field)
    else:
        for n, obj in iter_jsonl(src.path):
            yield n, _question(src, n, obj, text_field)


def _question(src: Source, n: int, obj: dict[str, Any], text_field: str) -> dict[str, Any]:
    if "id" not in obj:
        obj = {**obj, "id": src.default_id(n)}
    return question(src.path, n, obj, text_field)


def scan_questions(
    input_path: str | Path,
    *,
    text_field: str = "question",
    start_index: int = 0,
    num_samples: int | None = None,
) -> QuestionIndex:
    """Validate every record of an input (a JSONL or Parquet file, or a folder of them) in one
    streaming pass, with ``read_questions``' checks and messages, without keeping the records.
    (Where a file has a duplicate id and a later bad line, the bad line is reported first: the
    duplicate check runs once the whole input is read.)

    Memory is 16 bytes per record. Duplicate ids are refused by
    :meth:`QuestionIndex.check_unique`, to be called once the id digests are taken.
    """
    stop = None if num_samples is None else start_index + num_samples
    index = QuestionIndex(str(input_path), [], 0, start_index, text_field=text_field)
    starts, every = index.starts, index.id_hashes
    total = 0
    for src in list_sources(input_path):
        info: dict[str, Any] = {"source": src, "selected": 0, "first": None, "end": 0}
        if src.kind == "parquet":
            info["sha256"] = sha256_file(src.path)
            items: Iterator[tuple[int, int, int, dict[str, Any]]] = (
                (n, n - 1, n, obj) for n, obj in enumerate(_parquet_rows(src.path), start=1)
            )
        else:
            whole = hashlib.sha256()
            items = _jsonl_lines(src.path, whole)
        for n, at, end, obj in items:
            rec = _question(src, n, obj, text_field)
            every += id_hash(rec["id"])
            if total >= start_index and (stop is None or total < stop):
                if info["first"] is None:
                    info["first"] = n
                starts.append(at)
                info["selected"] += 1
                info["end"] = end
                index.has_answer = index.has_answer or "answer" in rec
            total += 1
        if src.kind != "parquet":
            info["sha256"] = whole.hexdigest()
        index.files.append(info)
    index.total = total
    if not total:
        raise RecordError(input_path, None, "file is empty: no records")
    if not starts:
        raise RecordError(
            input_path,
            None,
            none_selected(start_index, total, "file" if len(index.files) == 1 else "input"),
        )
    return index


def _jsonl_lines(path: Path, whole: Any) -> Iterator[tuple[int, int, int, dict[str, Any]]]:
    """(line, byte offset, end byte, object) of each non-blank line; hashes every byte."""
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise RecordError(path, None, "file not found") from None
    with fh:
        offset = 0
        for lineno, raw in enumerate(fh, start=1):
            whole.update(raw)
            obj = parse_line(path, lineno, raw)
            if obj is not None:
                yield lineno, offset, offset + len(raw), obj
            offset += len(raw)


# --------------------------------------------------------------------------- pieces


def piece_digests(
    input_path: str | Path,
    files: list[list[Any]],
    slices: list[list[list[Any]]],
    first_lines: dict[int, int],
) -> None:
    """Give each piece its digest (128 bits of sha256; and each JSONL piece its first line).

    A JSONL piece hashes its bytes (and counts its newlines, so the next piece of that file
    knows its first line); a Parquet piece hashes its rows' canonical JSON. Pieces come in file
    order, so each file is read once, front to back. ``first_lines[i]`` is the line file i's
    selection starts on.
    """
    line = dict(first_lines)
    groups = _Groups()
    for pieces in slices:
        for piece in pieces:
            label, kind, _ = files[piece[0]]
            src = source_of(input_path, label, kind)
            h = hashlib.sha256()
            if kind == "parquet":
                for rec in _parquet_rows(src.path, piece[1], piece[2], groups):
                    h.update(_canonical(rec))
            else:
                piece[3] = line[piece[0]]
                newlines = 0
                with open(src.path, "rb") as fh:
                    fh.seek(piece[1])
                    left = piece[2] - piece[1]
                    while left > 0 and (block := fh.read(min(_BLOCK, left))):
                        left -= len(block)
                        h.update(block)
                        newlines += block.count(b"\n")
                line[piece[0]] = piece[3] + newlines
            piece.append(h.hexdigest()[:32])


def slice_digest(pieces: list[list[Any]]) -> str:
    """A slice's digest: over its pieces' digests, in order."""
    return hashlib.sha256("".join(p[4] for p in pieces).encode()).hexdigest()[:32]


def read_pieces(
    input_path: str | Path,
    files: list[list[Any]],
    pieces: list[list[Any]],
    *,
    text_field: str = "question",
) -> list[dict[str, Any]]:
    """The validated records of a slice's pieces: the same records, ids included, that reading
    the whole input gives for them. Each piece must hash to the sha256 the launch recorded for
    it; otherwise RecordError names its file: it changed since then. A
    record that fails validation is reported as such only if its piece still hashes as at the
    launch; in a changed piece the change is what is reported."""
    out: list[dict[str, Any]] = []
    for piece in pieces:
        label, kind, _ = files[piece[0]]
        src = source_of(input_path, label, kind)
        h = hashlib.sha256()
        if kind == "parquet":
            bad, got = _read_parquet_piece(src, piece, h, text_field, out)
            if bad is None and got != piece[2] - piece[1]:
                raise _changed(src, piece)  # the file lost rows
        else:
            bad = _read_jsonl_piece(src, piece, h, text_field, out)
        if h.hexdigest()[:32] != piece[4]:
            raise _changed(src, piece)
        if bad is not None:
            raise bad
    return out


def _read_parquet_piece(
    src: Source, piece: list[Any], h: Any, text_field: str, out: list[dict[str, Any]]
) -> tuple[RecordError | None, int]:
    """Append the piece's validated rows to ``out``, hashing every row; returns the first
    validation error (the rest is still hashed) and how many rows there were."""
    bad: RecordError | None = None
    got = 0
    for n, rec in enumerate(_parquet_rows(src.path, piece[1], piece[2]), piece[1] + 1):
        h.update(_canonical(rec))
        got += 1
        if bad is None:
            try:
                out.append(_question(src, n, rec, text_field))
            except RecordError as err:
                bad = err
    return bad, got


def _changed(src: Source, piece: list[Any]) -> RecordError:
    what = (
        f"rows {piece[1] + 1}-{piece[2]}"
        if src.kind == "parquet"
        else f"bytes {piece[1]}-{piece[2]} (from line {piece[3]})"
    )
    return RecordError(
        src.path,
        None,
        f"the input changed since the launch: {what} no longer hash to the plan's sha256; "
        "relaunch into a new --run-dir",
    )


def _read_jsonl_piece(
    src: Source, piece: list[Any], h: Any, text_field: str, out: list[dict[str, Any]]
) -> RecordError | None:
    """Append the piece's validated records to ``out``, hashing every byte; returns the first
    validation error (the rest of the piece is still hashed)."""
    start, end, first_line = piece[1], piece[2], piece[3]
    bad: RecordError | None = None

    def take(lineno: int, raw: bytes) -> None:
        nonlocal bad
        if bad is None:
            try:
                obj = parse_line(src.path, lineno, raw)
                if obj is not None:
                    out.append(_question(src, lineno, obj, text_field))
            except RecordError as err:
                bad = err

    try:
        fh = open(src.path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise RecordError(src.path, None, "file not found") from None
    with fh:
        fh.seek(start)
        left, rest, lineno = end - start, b"", first_line
        while left > 0:
            block = fh.read(min(_BLOCK, left))
            if not block:
                raise _changed(src, piece)  # the file is shorter than at the launch
            left -= len(block)
            h.update(block)
            parts = (rest + block).split(b"\n")
            rest = parts.pop()
            for raw in parts:
                take(lineno, raw + b"\n")
                lineno += 1
        if rest:
            take(lineno, rest)
    return bad
