"""Fingerprints: everything that determines a stage's output, pinned in its run folder.

A run folder holds the output of ONE set of settings. The first launch of a stage writes
``RUN_DIR/<stage>/fingerprint.json``: the model folders (hashes of their config, tokenizer and
weight index files, and of each weight file's header), the prompt template's text, the engine and
decoding settings, and for training the data and hyperparameters. A relaunch computes the same
fields and is refused, naming each field with its old and new value, when any differs: it would
otherwise mix two teachers' traces in one dataset, or call an old result the new one's.

Only the launcher computes fingerprints; reading a few small files per model, it takes
milliseconds whatever the size of the weights.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cot.records import atomic_write_text
from hpc.errors import PlanError
from hpc.shards import sha256_file

FILE = "fingerprint.json"
_MISSING = "(none)"  # how a field one side lacks is shown
# Small files of a model folder that change what it computes.
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
    "adapter_config.json",
)


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def _safetensors_header(path: Path) -> str:
    """sha256 of a safetensors file's header (tensor names, shapes, dtypes, offsets) and size.

    The header is the first ``8 + n`` bytes; hashing it costs the same for 1 MB or 100 GB.
    """
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return sha256_bytes(head)
        (n,) = struct.unpack("<Q", head)
        body = fh.read(min(n, 100 << 20))
    return sha256_bytes(head + body + str(path.stat().st_size).encode())


def model(path: str | Path | None, *, full_weights: bool = False) -> dict[str, Any] | None:
    """The fingerprint of a model (or adapter) folder: its path and file hashes.

    Args:
        full_weights: hash whole weight files (an adapter's are small) instead of headers.
    """
    if path is None:
        return None
    folder = Path(path)
    if not folder.is_dir():  # a model name on a running server: only the name is known
        return {"path": str(path)}
    files: dict[str, str] = {}
    for name in MODEL_FILES:
        p = folder / name
        if p.is_file():
            files[name] = sha256_file(p)
    for p in sorted(folder.glob("*.safetensors")):
        files[p.name] = sha256_file(p) if full_weights else _safetensors_header(p)
    return {"path": str(folder.resolve()), "files": files}


def text_file(path: str | Path | None) -> str | None:
    """sha256 of a file's bytes (a prompt template, a DeepSpeed config, a data file)."""
    if path is None or str(path) == "" or not Path(path).is_file():
        return None  # validation has already refused a file that a stage needs
    return sha256_file(Path(path))


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"teacher": {"files": {"config.json": h}}}`` -> ``{"teacher.files.config.json": h}``."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out if value else {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): value}


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``field: old -> new`` for every field that differs (a missing one reads ``(none)``)."""
    a, b = flatten(old), flatten(new)
    out = []
    for key in sorted(set(a) | set(b)):
        if (key in a) != (key in b) or a.get(key) != b.get(key):
            old_text, new_text = _shown(a, key), _shown(b, key)
            if old_text == new_text:  # both present (a missing side prints apart), yet alike:
                old_text, new_text = json.dumps(a[key]), json.dumps(b[key])  # 1 and "1", ...
            out.append(f"{key}: {old_text} -> {new_text}")
    return out


def _shown(fields: Mapping[str, Any], key: str) -> str:
    return _short(fields[key]) if key in fields else _MISSING


def _short(value: Any) -> str:
    # a string is shown bare, unless it could be read as a missing field's placeholder
    text = value if isinstance(value, str) and value != _MISSING else json.dumps(value)
    if len(text) == 64 and all(c in "0123456789abcdef" for c in text):
        return f"sha256 {text[:12]}"
    return text if len(text) <= 120 else text[:117] + "..."


def check(stage_dir: Path, fingerprint: Mapping[str, Any]) -> bool:
    """Refuse a fingerprint that differs from the pinned one; True when one is pinned.

    Raises:
        PlanError: naming the file and every differing field, with its old and new value.
    """
    path = stage_dir / FILE
    if not path.exists():
        return False
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise PlanError(f"{path}: not valid JSON ({e}); restore it or use a new --run-dir") from e
    diff = differences(old, fingerprint)
    if diff:
        lines = "\n  ".join(diff)
        raise PlanError(
            f"{path}: refusing to relaunch {stage_dir.name} into this run folder with other "
            f"settings; its output was made with the pinned ones. Differing:\n  {lines}\n"
            "Use a new --run-dir, or the original settings."
        )
    return True


def pin(stage_dir: Path, fingerprint: Mapping[str, Any]) -> None:
    """Write the fingerprint once (after :func:`check`); an existing one is left as it is."""
    if check(stage_dir, fingerprint):
        return
    stage_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stage_dir / FILE, json.dumps(fingerprint, indent=1, sort_keys=True))
