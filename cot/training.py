"""LoRA fine-tuning of the student on teacher traces: data, loss mask, checkpoints, Trainer.

Nothing here knows about clusters. The stage callable (``jobs/train.py``) sets up the rank
environment and hands in a ``stop_requested`` function; everything else is plain HF Trainer.

- **Data.** Each record becomes ``student_prompt(question) + cot + EOS``. The loss falls on the
  answer tokens only: the mask comes from the character offsets of the one tokenisation of the
  whole text (a token counts as answer when it starts at or after the end of the prompt),
  never from searching for a re-tokenised marker, which breaks when BPE merges across the seam.
- **Batches.** A seeded, epoch-aware sampler sorts shuffled megabatches by length, so each
  micro-batch holds similar lengths and padding stays small; the order depends only on
  (seed, epoch), so a resumed run sees exactly the batches an uninterrupted run would.
- **Checkpoints.** A checkpoint is complete only once rank 0 has written its marker, after all
  ranks finished their part of the (collective) save. The marker lists every file with its size,
  so a folder with files deleted later is still recognised as torn and skipped on resume.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cot.errors import InputError
from cot.prompts import student_prompt
from cot.records import RecordError, atomic_dir, atomic_write_text, iter_jsonl

log = logging.getLogger(__name__)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
IGNORE_INDEX = -100
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_MARKER = "COMPLETE"
# Micro-batches per length-sorted megabatch: large enough that neighbours have similar lengths,
# small enough that the order stays well shuffled.
MEGABATCH_BATCHES = 32


# --------------------------------------------------------------------------- records


def read_training_records(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate a training file: every record needs non-empty string ``question``/``cot``.

    Records with an ``error`` (a trace the engine could not produce) are skipped and counted.

    Raises:
        RecordError: ``FILE:LINE: field 'x': ...`` for bad JSON, a missing or non-string field,
            or an empty file.
    """
    records: list[dict[str, Any]] = []
    skipped = 0
    for lineno, obj in iter_jsonl(path):
        if obj.get("error") is not None:
            skipped += 1  # the engine could not produce this trace (the merge counted it)
            continue
        for name in ("question", "cot"):
            if name not in obj:
                raise RecordError(path, lineno, "missing", field=name)
            value = obj[name]
            if not isinstance(value, str):
                got = type(value).__name__
                raise RecordError(path, lineno, f"must be a string, got {got}", field=name)
            if not value.strip():
                raise RecordError(path, lineno, "must not be empty", field=name)
        records.append({"question": obj["question"], "cot": obj["cot"], "line": lineno})
    if skipped:
        log.warning(f"{path}: skipped {skipped} error records (no trace was generated for them)")
    if not records:
        what = f"all {skipped} records are error records" if skipped else "file is empty"
        raise RecordError(path, None, f"{what}: no records to train on")
    return records


# --------------------------------------------------------------------------- tokenisation


def answer_mask(offsets: Sequence[Sequence[int]], prompt_chars: int) -> list[bool]:
    """True for tokens of the answer: those that start at or after the prompt's end.

    A token straddling the seam belongs to the prompt (it is not trained on); special tokens
    carry empty ``(0, 0)`` spans and never count as answer.
    """
    return [int(s) >= prompt_chars and int(e) > int(s) for s, e in offsets]


@dataclass
class DataStats:
    """What tokenisation did to the records (reported once, saved with the outputs)."""

    records: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_answer: int = 0
    tokens: int = 0
    answer_tokens: int = 0
    longest: int = 0
    overlong_lines: list[int] = field(default_factory=list)

    def describe(self, max_length: int) -> str:
        """One line for the log."""
        over = self.truncated + self.dropped_overlong + self.dropped_no_answer
        text = (
            f"data: {self.kept} of {self.records} records, {self.tokens} tokens "
            f"({self.answer_tokens} answer tokens), longest {self.longest}"
        )
        if over:
            lines = ", ".join(str(n) for n in self.overlong_lines[:5])
            more = ", ..." if over > 5 else ""
            text += (
                f"; {over} over --max-length {max_length} (lines {lines}{more}): "
                f"{self.truncated} truncated, {self.dropped_overlong} dropped"
            )
        if self.dropped_no_answer:
            text += f", {self.dropped_no_answer} dropped as the prompt alone fills it"
        return text


def encode_example(
    tokenizer: Any, question: str, cot: str, max_length: int, overlong: str = "truncate"
) -> tuple[dict[str, Any] | None, str]:
    """Tokenise one record with its loss mask; returns (example or None, status).

    Status is ``ok``, ``truncated``, ``dropped_overlong`` or ``dropped_no_answer``.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InputError("the tokenizer has no eos token; cannot mark the end of an answer")
    prompt = student_prompt(question)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(prompt + cot, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        mask = answer_mask(enc["offset_mapping"], len(prompt))
    else:
        # Slow tokenizers have no offsets: tokenise the prompt and the answer separately and
        # count, so the model trains on exactly this split.
        p_ids = list(tokenizer(prompt)["input_ids"])
        a_ids = list(tokenizer(cot, add_special_tokens=False)["input_ids"])
        ids, mask = p_ids + a_ids, [False] * len(p_ids) + [True] * len(a_ids)
    ids.append(eos)
    mask.append(True)  # the model must learn to stop
    status = "ok"
    if len(ids) > max_length:
        if overlong == "drop":
            return None, "dropped_overlong"
        ids, mask = ids[:max_length], mask[:max_length]
        status = "truncated"
    if not any(mask):
        return None, "dropped_no_answer"
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
    return {"input_ids": ids, "labels": labels, "length": len(ids)}, status


def build_examples(
    tokenizer: Any, records: Sequence[dict[str, Any]], max_length: int, overlong: str = "truncate"
) -> tuple[list[dict[str, Any]], DataStats]:
    """Tokenise all records; overlong ones are truncated or dropped and counted."""
    stats = DataStats(records=len(records))
    out: list[dict[str, Any]] = []
    for rec in records:
        ex, status = encode_example(tokenizer, rec["question"], rec["cot"], max_length, overlong)
        if status != "ok":  # a record without answer tokens was cut by max_length too
            stats.overlong_lines.append(int(rec.get("line", len(out) + 1)))
        if status == "truncated":
            stats.truncated += 1
        elif status == "dropped_overlong":
            stats.dropped_overlong += 1
        elif status == "dropped_no_answer":
            stats.dropped_no_answer += 1
        if ex is None:
            continue
        out.append(ex)
        stats.kept += 1
        stats.tokens += ex["length"]
        stats.answer_tokens += sum(1 for t in ex["labels"] if t != IGNORE_INDEX)
        stats.longest = max(stats.longest, ex["length"])
    return out, stats


class PadCollator:
    """Right-pad a micro-batch to its own longest example (labels padded with -100)."""

    def __init__(self, pad_token_id: int, pad_to: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to = pad_to  # the seed's baseline: pad everything to max_length

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        n = self.pad_to or max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), n), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), n), IGNORE_INDEX, dtype=torch.long)
        attn = torch.zeros((len(features), n), dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            ids[i, :k] = torch.tensor(f["input_ids"], dtype=torch.long)
            labels[i, :k] = torch.tensor(f["labels"], dtype=torch.long)
            attn[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": attn}


# --------------------------------------------------------------------------- length grouping


def grouped_order(lengths: Sequence[int], batch_size: int, seed: int, epoch: int = 0) -> list[int]:
    """A shuffled order whose consecutive ``batch_size`` runs have similar lengths.

    Shuffle with a generator seeded by (seed, epoch), cut into megabatches of
    ``MEGABATCH_BATCHES`` micro-batches, sort each by length (longest first, so a too-large
    batch fails early), then shuffle the micro-batches within the megabatch. A pure function.
    """
    rng = random.Random(f"{seed}:{epoch}")
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    mega = max(1, batch_size) * MEGABATCH_BATCHES
    out: list[int] = []
    for i in range(0, len(idx), mega):
        chunk = sorted(idx[i : i + mega], key=lambda j: -lengths[j])
        batches = [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
        head, tail = batches[:1], batches[1:]
        rng.shuffle(tail)
        for b in head + tail:
            out.extend(b)
    return out


def non_pad_fraction(
    lengths: Sequence[int], order: Sequence[int], batch_size: int, pad_to: int | None = None
) -> float:
    """Real tokens / padded tokens when ``order`` is cut into batches of ``batch_size``."""
    real = padded = 0
    for i in range(0, len(order), batch_size):
        batch = [lengths[j] for j in order[i : i + batch_size]]
        real += sum(batch)
        padded += (pad_to or max(batch)) * len(batch)
    return real / padded if padded else 1.0


class LengthGroupedSampler:
    """A Sampler (duck-typed) over :func:`grouped_order`; accelerate calls ``set_epoch``."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Pick the epoch's order (called by the Trainer at every epoch start, and on resume)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(grouped_order(self.lengths, self.batch_size, self.seed, self.epoch))

    def __len__(self) -> int:
        return len(self.lengths)


# --------------------------------------------------------------------------- checkpoints


def checkpoint_step(path: Path) -> int | None:
    """The step of a ``checkpoint-<step>`` folder, else None."""
    m = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
    return int(m.group(1)) if m else None


def list_checkpoints(root: str | Path) -> list[Path]:
    """``checkpoint-<step>`` folders under ``root``, oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in root.iterdir() if p.is_dir()]
    return [p for step, p in sorted((s, p) for s, p in found if s is not None)]


def _manifest(ckpt: Path) -> dict[str, int]:
    files = {}
    for p in sorted(ckpt.rglob("*")):
        if p.is_file() and p.name != CHECKPOINT_MARKER:
            files[str(p.relative_to(ckpt))] = p.stat().st_size
    return files


def write_checkpoint_marker(ckpt: str | Path, step: int, **info: Any) -> Path:
    """Mark a checkpoint complete: fsync its files, then write the manifest marker last."""
    ckpt = Path(ckpt)
    files = _manifest(ckpt)
    if not files:
        raise ValueError(f"{ckpt}: refusing to mark an empty checkpoint complete")
    for rel in files:
        fd = os.open(ckpt / rel, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    marker = ckpt / CHECKPOINT_MARKER
    atomic_write_text(marker, json.dumps({"step": step, "files": files, **info}, indent=1))
    return marker


def checkpoint_complete(ckpt: str | Path) -> bool:
    """True when the marker exists, parses, and every file it lists is there with its size."""
    ckpt = Path(ckpt)
    try:
        data = json.loads((ckpt / CHECKPOINT_MARKER).read_text(encoding="utf-8"))
        files = data["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if not isinstance(files, dict) or not files:
        return False
    for rel, size in files.items():
        p = ckpt / rel
        try:
            if p.stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def latest_complete_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root``; torn ones (no marker, files gone) skipped."""
    for ckpt in reversed(list_checkpoints(root)):
        if checkpoint_complete(ckpt):
            return ckpt
        log.warning("skipping incomplete checkpoint %s", ckpt)
    return None


def checkpoints_to_delete(root: str | Path, keep: int) -> list[Path]:
    """What rotation removes: complete ones beyond the newest ``keep``, and torn ones older
    than the newest complete one. Nothing newer than the newest complete one is touched."""
    ckpts = list_checkpoints(root)
    complete = [c for c in ckpts if checkpoint_complete(c)]
    if not complete:
        return []
    keepers = set(complete[-max(1, keep) :])
    newest = checkpoint_step(complete[-1]) or 0
    return [c for c in ckpts if c not in keepers and (checkpoint_step(c) or 0) < newest]


def rotate_checkpoints(root: str | Path, keep: int) -> list[Path]:
    """Delete what :func:`checkpoints_to_delete` names; returns the folders really gone (one that
    cannot be removed, a symlink or a busy NFS file, stays and is not reported)."""
    doomed = checkpoints_to_delete(root, keep)
    for c in doomed:
        shutil.rmtree(c, ignore_errors=True)
    return [c for c in doomed if not os.path.lexists(c)]


def torn_after(root: str | Path, step: int) -> list[Path]:
    """Incomplete checkpoints newer than ``step`` (left by a crash; removed before resuming)."""
    return [
        c
        for c in list_checkpoints(root)
        if (checkpoint_step(c) or 0) > step and not checkpoint_complete(c)
    ]


def superseded_after(root: str | Path, step: int) -> list[Path]:
    """Complete checkpoints newer than ``step``, the resume point asked for by name.

    Training again from ``step`` saves its own ``checkpoint-N`` for these N: left in place, one
    would be written into while its old marker still vouched for it (a crash in between leaves
    a mix that reads complete), and a later resume could pick it. They are moved aside, kept.
    """
    return [
        c
        for c in list_checkpoints(root)
        if (checkpoint_step(c) or 0) > step and checkpoint_complete(c)
    ]


START_RECORD = ".resume_start.json"  # in the checkpoints folder: where its line of training began
SUPERSEDED = "superseded"  # in the checkpoints folder: complete checkpoints an explicit start moved


def start_step(path: str | Path) -> int:
    """The step training resumes at from ``path``: a ``checkpoint-<step>`` folder's number,
    else the ``global_step`` of its ``trainer_state.json``, else 0 (no trainer state: the
    Trainer starts counting again)."""
    path = Path(path)
    step = checkpoint_step(path)
    if step is not None:
        return step
    try:
        return int(
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))["global_step"]
        )
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def recorded_start(root: str | Path) -> dict[str, Any] | None:
    """What :func:`_choose_resume` recorded of the explicit start of ``root``'s training, if any."""
    try:
        data = json.loads((Path(root) / START_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("path"), str):
        return None
    return data if isinstance(data.get("step"), int) else None


def started_from(root: str | Path, explicit: str | Path) -> dict[str, Any] | None:
    """The record when ``explicit`` is the recorded start of ``root``'s line of training (a
    requeue or a relaunch of that start, which may go on after rotation removed the start
    itself), else None."""
    begun = recorded_start(root)
    return begun if begun is not None and begun["path"] == str(Path(explicit).resolve()) else None


# --------------------------------------------------------------------------- settings


def resolve_quant_and_optim(quant: str, optim: str, cuda: bool) -> tuple[bool, str, str | None]:
    """(load in NF4, optimizer name, one log line or None) for ``--quant`` and ``--optim``.

    ``auto`` means NF4 and paged_adamw_8bit where CUDA is present, full precision and
    adamw_torch on CPU. Both can be forced on CPU, which is how tests cover the GPU path.
    """
    nf4 = quant == "nf4" or (quant == "auto" and cuda)
    name = optim if optim != "auto" else ("paged_adamw_8bit" if cuda else "adamw_torch")
    fell_back = [
        what
        for what, auto in (
            ("full precision instead of NF4", quant == "auto"),
            ("adamw_torch instead of paged_adamw_8bit", optim == "auto"),
        )
        if auto and not cuda
    ]
    note = f"train: no CUDA device: {' and '.join(fell_back)}" if fell_back else None
    return nf4, name, note


def load_deepspeed_config(path: str | Path | None) -> dict[str, Any] | None:
    """The DeepSpeed config as a dict, without ``_comment``-style keys; None means plain DDP."""
    if path is None or str(path).strip() in ("", "null", "none", "None"):
        return None
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{p}: DeepSpeed config not found") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{p}:{e.lineno}: invalid JSON in DeepSpeed config: {e.msg}") from None
    if not isinstance(data, dict):
        raise InputError(f"{p}: a DeepSpeed config must be a JSON object")
    # DeepSpeed rejects unknown top-level keys in some versions; the comment is for humans.
    return {k: v for k, v in data.items() if not k.startswith("_")}


def prepare_lora_model(
    model: Any,
    *,
    r: int,
    lora_alpha: int,
    lora_dropout: float,
    quantized: bool,
    gradient_checkpointing: bool,
    seed: int,
) -> Any:
    """Wrap the student in LoRA adapters on q/k/v/o/up/down_proj (k-bit prepared if NF4).

    Only the adapters train, in fp32, whatever dtype the base weights have.
    """
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    gc_kwargs = {"use_reentrant": False}
    if quantized:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs=gc_kwargs,
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        model.enable_input_require_grads()
    model.config.use_cache = False
    # LoRA's initial weights come from the global RNG: seed it here or runs are not repeatable.
    set_seed(seed)
    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=list(LORA_TARGETS),
        bias="none",
    )
    peft_model = get_peft_model(model, lora)
    # Adapters train in fp32 over fp16/bf16 base weights: the fp16 GradScaler refuses to
    # unscale fp16 gradients. peft upcasts by default; this holds whatever it does.
    for param in peft_model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return peft_model


# --------------------------------------------------------------------------- metrics


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of metrics.jsonl (a torn last line is ignored)."""
    p = Path(path)
    if not p.exists():
        return []
    rows = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def truncate_metrics(path: str | Path, step: int) -> None:
    """Drop rows after ``step``: a resumed run logs those steps again."""
    p = Path(path)
    rows = read_metrics(p)
    keep = [r for r in rows if int(r.get("step", 0)) <= step]
    if len(keep) != len(rows):
        atomic_write_text(p, "".join(json.dumps(r) + "\n" for r in keep))


def plot_metrics(metrics: str | Path, png: str | Path) -> Path | None:
    """training_loss.png from metrics.jsonl (matplotlib Agg); None when there is nothing to plot."""
    rows = [r for r in read_metrics(metrics) if r.get("loss") is not None]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker="o", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (answer tokens)")
    ax.set_title("student LoRA training")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = Path(png)
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png)
    return png


# --------------------------------------------------------------------------- trainer


def peak_gpu_memory_gb() -> float | None:
    """Peak GPU memory allocated by this process so far (GiB), or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 3)


def _dist() -> Any:
    """torch.distributed when a process group is up, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    dist = _dist()
    if dist is not None:
        dist.barrier()


def any_rank(flag: bool, device: Any) -> bool:
    """True on every rank when ``flag`` is True on at least one (an all-reduce MAX)."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return flag
    import torch

    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def make_callbacks(
    *,
    checkpoint_root: Path,
    keep: int,
    metrics_path: Path,
    stop_requested: Callable[[], bool],
    world_size: int,
) -> list[Any]:
    """The three callbacks: stop on request, mark+rotate checkpoints, metrics.jsonl."""
    from transformers import TrainerCallback

    class StopOnRequest(TrainerCallback):  # type: ignore[misc]
        """At every optimizer step, ranks agree whether any got the stop signal; then save."""

        def __init__(self) -> None:
            self.stopped_at: int | None = None

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
            if any_rank(stop_requested(), args.device):
                self.stopped_at = state.global_step
                control.should_save = True
                control.should_training_stop = True
            return control

    class MarkCheckpoints(TrainerCallback):  # type: ignore[misc]
        """After the collective save: rank 0 writes the marker last, then rotates."""

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
            barrier()  # every rank has written its shard, rng state and optimizer partition
            if state.is_world_process_zero:
                ckpt = checkpoint_root / f"{CHECKPOINT_PREFIX}{state.global_step}"
                write_checkpoint_marker(ckpt, state.global_step, world_size=world_size)
                for gone in rotate_checkpoints(checkpoint_root, keep):
                    log.info(f"removed old checkpoint {gone.name}")
                log.info(f"checkpoint {ckpt.name} complete")
            barrier()
            return control

    class JsonlMetrics(TrainerCallback):  # type: ignore[misc]
        """One JSON line per logging step: loss, learning rate, tokens/s, step time."""

        def __init__(self) -> None:
            self.t_last = time.time()
            self.tokens_last = 0
            self.step_times: list[float] = []
            self.t_step = time.time()

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
            self.t_last = self.t_step = time.time()
            self.tokens_last = state.num_input_tokens_seen
            if state.is_world_process_zero:
                truncate_metrics(metrics_path, state.global_step)
            return control

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
            self.t_step = time.time()
            return control

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
            self.step_times.append(time.time() - self.t_step)
            return control

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> Any:
            if not logs or "loss" not in logs or not state.is_world_process_zero:
                return control
            now = time.time()
            tokens = state.num_input_tokens_seen
            dt = max(now - self.t_last, 1e-9)
            row = {
                "step": state.global_step,
                "epoch": round(float(state.epoch or 0.0), 4),
                "loss": float(logs["loss"]),
                "learning_rate": float(logs.get("learning_rate", 0.0)),
                "grad_norm": float(logs["grad_norm"]) if "grad_norm" in logs else None,
                "tokens": int(tokens),
                "tokens_per_s": round((tokens - self.tokens_last) / dt, 1),
                "step_time_s": round(sum(self.step_times) / max(1, len(self.step_times)), 4),
                "time": now,
            }
            peak = peak_gpu_memory_gb()
            if peak is not None:
                row["gpu_peak_mem_gb"] = peak
            metrics_path.parent.mkdir(parents=True, exist_ok=True)
            with open(metrics_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            self.t_last, self.tokens_last, self.step_times = now, tokens, []
            return control

    return [StopOnRequest(), MarkCheckpoints(), JsonlMetrics()]


@dataclass(frozen=True)
class TrainHParams:
    """Everything one training run needs to know, typed (the way open-r1's ``sft.py`` takes
    ``ScriptArguments``/``SFTConfig``). The cluster layer builds it from its ``TrainConfig``."""

    student: str
    data: str
    epochs: float = 3.0
    max_steps: int | None = None
    lr: float = 2.0e-4
    per_device_train_batch_size: int = 2
    gradient_accumulation_steps: int = 4
    r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    max_length: int = 1024
    overlong: str = "truncate"
    quant: str = "auto"
    precision: str = "auto"
    optim: str = "auto"
    deepspeed: str | None = None
    save_steps: int = 50
    save_total_limit: int = 2
    logging_steps: int = 5
    gradient_checkpointing: bool = False
    report_to: str = "none"
    resume_from_checkpoint: str | None = None
    trust_remote_code: bool = False
    seed: int = 42

    @classmethod
    def pick(cls, source: Any) -> TrainHParams:
        """The fields of ``source`` (any object with these attribute names) that this has."""
        from dataclasses import fields

        return cls(**{f.name: getattr(source, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class TrainOutputs:
    """The files of a training output folder (``--out-dir``)."""

    dir: Path

    @property
    def checkpoints(self) -> Path:
        """``checkpoints/checkpoint-<step>/``, each complete once its marker exists."""
        return self.dir / "checkpoints"

    @property
    def adapter(self) -> Path:
        """``adapter/``: the final LoRA adapter."""
        return self.dir / "adapter"

    @property
    def metrics(self) -> Path:
        """``metrics.jsonl``: one line per logging step."""
        return self.dir / "metrics.jsonl"

    @property
    def loss_plot(self) -> Path:
        """``training_loss.png``, drawn from ``metrics.jsonl``."""
        return self.dir / "training_loss.png"

    @property
    def tensorboard(self) -> Path:
        """``tensorboard/``: event files, with ``--report-to tensorboard``."""
        return self.dir / "tensorboard"

    @property
    def wandb(self) -> Path:
        """``wandb/``: the offline W&B run, with ``--report-to wandb``."""
        return self.dir / "wandb"

    @property
    def engine(self) -> Path:
        """``engine.json``: what DeepSpeed/DDP actually ran."""
        return self.dir / "engine.json"

    @property
    def summary(self) -> Path:
        """``train_summary.json``."""
        return self.dir / "train_summary.json"

    @property
    def config(self) -> Path:
        """``config.yaml``: the resolved training config."""
        return self.dir / "config.yaml"


def training_arguments(
    cfg: TrainHParams,
    *,
    output_dir: Path,
    optim: str,
    deepspeed: dict[str, Any] | None,
    cuda: bool,
    precision: str,
) -> Any:
    """HF TrainingArguments from the stage config (transformers 5 names).

    ``precision`` is the one :func:`cot.models.pick_precision` made for ``cfg.precision``
    (``run_training`` decides once; the weights are loaded in the same dtype).
    """
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=float(cfg.epochs),
        max_steps=int(cfg.max_steps) if cfg.max_steps else -1,
        learning_rate=float(cfg.lr),
        per_device_train_batch_size=int(cfg.per_device_train_batch_size),
        gradient_accumulation_steps=int(cfg.gradient_accumulation_steps),
        lr_scheduler_type="linear",
        warmup_steps=0,
        logging_steps=int(cfg.logging_steps),
        save_strategy="steps",
        save_steps=int(cfg.save_steps),
        save_total_limit=None,  # rotation is ours: it must know which checkpoints are complete
        seed=int(cfg.seed),
        optim=optim,
        deepspeed=deepspeed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not cuda,
        # gloo for CPU processes; with one process there is no group to back at all.
        ddp_backend=None if cuda or _world_size() == 1 else "gloo",
        ddp_find_unused_parameters=False,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        report_to=cfg.report_to,  # where its files go: reporter_env
        disable_tqdm=not sys.stderr.isatty(),
        logging_first_step=True,
    )


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


# W&B modes that never reach the network (dryrun is the old name of offline).
WANDB_QUIET_MODES = ("offline", "dryrun", "disabled")


def reporter_env(
    report_to: str, out_dir: Path, environ: Mapping[str, str]
) -> tuple[dict[str, str], str | None]:
    """The variables that put ``--report-to``'s files in ``out_dir``, and one line or None.

    TensorBoard writes to ``out_dir/tensorboard`` (HF's default is a ``runs/`` folder beside
    the checkpoints). W&B runs offline into ``out_dir/wandb`` whatever ``WANDB_MODE`` said:
    compute nodes must not reach the network (``wandb sync`` uploads later, from a login node).
    """
    if report_to == "tensorboard":
        return {"TENSORBOARD_LOGGING_DIR": str(TrainOutputs(out_dir).tensorboard)}, None
    if report_to != "wandb":
        return {}, None
    env = {"WANDB_DIR": str(out_dir)}
    if "WANDB_PROJECT" not in environ:
        env["WANDB_PROJECT"] = "cot-hpc"
    mode = environ.get("WANDB_MODE", "")
    note = None
    if mode not in WANDB_QUIET_MODES:
        env["WANDB_MODE"] = "offline"
        if mode:
            note = (
                f"WANDB_MODE={mode} ignored: W&B runs offline on compute nodes "
                f"(upload later with `wandb sync {TrainOutputs(out_dir).wandb}/offline-run-*`)"
            )
    return env, note


@contextlib.contextmanager
def scoped_environ(env: Mapping[str, str]) -> Iterator[None]:
    """Set ``env`` in ``os.environ`` for the block, then put the old values back."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def build_trainer(
    model: Any,
    tokenizer: Any,
    examples: list[dict[str, Any]],
    args: Any,
    callbacks: list[Any],
) -> Any:
    """A Trainer whose train sampler is the seeded :class:`LengthGroupedSampler`."""
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback

    sampler = LengthGroupedSampler(
        [ex["length"] for ex in examples], args.per_device_train_batch_size, args.seed
    )

    class GroupedTrainer(Trainer):  # type: ignore[misc]
        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            return sampler

    class SyncSamplerEpoch(TrainerCallback):  # type: ignore[misc]
        """Tell the sampler which epoch starts, from the trainer state.

        On resume, accelerate's ``skip_first_batches`` wraps a sharded batch sampler so that the
        Trainer's ``set_epoch`` no longer reaches our sampler, and the resumed epoch would replay
        epoch 0's order. ``state.epoch`` is whole at an epoch start and fractional (2.67) right
        after a resume, so its floor is the epoch in both cases.
        """

        def on_epoch_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
            sampler.set_epoch(math.floor(state.epoch or 0.0))
            return control

    dataset = Dataset.from_list(examples)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return GroupedTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=PadCollator(pad_id),
        processing_class=tokenizer,
        callbacks=[SyncSamplerEpoch(), *callbacks],
    )


def engine_info(trainer: Any) -> dict[str, Any]:
    """What actually ran, read from the engine itself: ZeRO stage, optimizer, 4-bit layers."""
    import torch

    dist = torch.distributed
    wrapped: Any = getattr(trainer, "model_wrapped", None)
    deepspeed = bool(trainer.is_deepspeed_enabled)
    stage = None
    if deepspeed and hasattr(wrapped, "zero_optimization_stage"):
        stage = int(wrapped.zero_optimization_stage())
    # Peel the wrappers (DeepSpeed's ZeRO optimizer, accelerate's) down to the real optimizer.
    opt: Any = getattr(wrapped, "optimizer", None) if deepspeed else trainer.optimizer
    outer = type(opt).__name__ if opt is not None else None
    while hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return {
        "world_size": int(trainer.args.world_size),
        "device": str(trainer.args.device),
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "deepspeed": deepspeed,
        "zero_stage": stage,
        "optimizer_wrapper": outer,
        "optimizer_class": f"{type(opt).__module__}.{type(opt).__name__}",
        "paged": getattr(opt, "is_paged", None),
        "optim_bits": getattr(getattr(opt, "args", None), "optim_bits", None),
        "quantized_4bit": any(type(m).__name__ == "Linear4bit" for m in trainer.model.modules()),
    }


@dataclass
class TrainResult:
    """What one attempt of the training callable did."""

    preempted: bool
    global_step: int
    resumed_from: str | None
    data: dict[str, Any]
    engine: dict[str, Any]
    seconds: float
    final_loss: float | None = None
    gpu_peak_mem_gb: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (pickled into submitit's result)."""
        return asdict(self)


def save_adapter_atomically(model: Any, tokenizer: Any, dest: Path) -> Path:
    """Write the adapter and tokenizer to a uniquely named temp folder beside ``dest``, fsync
    them, then put the folder in ``dest``'s place (see ``cot.records.atomic_dir``)."""
    with atomic_dir(dest) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return dest


def _explicit_start(explicit: str, root: Path) -> str:
    """Rank 0's choice for ``--resume-from-checkpoint explicit`` (see :func:`_choose_resume`)."""
    path = Path(explicit).resolve()
    begun = started_from(root, path)
    if begun is not None:  # a requeue or relaunch of this start
        latest = latest_complete_checkpoint(root)
        if latest is not None and start_step(latest) > begun["step"]:
            log.info(f"resuming from {latest.name}, saved since training started from {explicit}")
            return str(latest)
    if not path.is_dir():
        raise InputError(f"--resume-from-checkpoint {explicit}: no such folder")
    if not checkpoint_complete(path):
        log.warning(f"{explicit} has no completion marker; resuming from it as asked")
    step = start_step(path)
    newer = superseded_after(root, step)
    if newer:
        (root / SUPERSEDED).mkdir(parents=True, exist_ok=True)
        aside = Path(tempfile.mkdtemp(prefix=f"from-step-{step}.", dir=root / SUPERSEDED))
        for ckpt in newer:
            os.replace(ckpt, aside / ckpt.name)
            log.warning(
                f"moved {ckpt.name} aside to {aside / ckpt.name} (newer than the resume point "
                f"{explicit}: another line of training)"
            )
    atomic_write_text(root / START_RECORD, json.dumps({"path": str(path), "step": step}))
    return str(path)


def _choose_resume(explicit: str | None, root: Path) -> str | None:
    """Rank 0 picks the checkpoint (explicit, else the newest complete one) and tells the rest.

    ``explicit`` (``--resume-from-checkpoint``) starts a line of training. The first time,
    the complete checkpoints newer than it are moved into ``root/superseded/`` (kept, never
    deleted: training again from there saves its own ``checkpoint-N``, never into an old one
    whose marker would still vouch for it) and the start is recorded in ``root``. A requeue or
    a relaunch with the same ``explicit`` then goes on from what that line saved since, even
    once rotation removed the start itself. Deciding once and broadcasting keeps the ranks in
    agreement even if a folder's state were to look different from two nodes of a shared
    filesystem.
    """
    choice: str | None = None
    dist = _dist()
    rank = dist.get_rank() if dist is not None else 0
    if rank == 0:
        if explicit:
            choice = _explicit_start(explicit, root)
        else:
            latest = latest_complete_checkpoint(root)
            choice = str(latest) if latest else None
        for torn in torn_after(root, start_step(choice) if choice else 0):
            log.info(f"removing torn checkpoint {torn.name} (no complete marker)")
            shutil.rmtree(torn, ignore_errors=True)
    if dist is not None:
        box = [choice]
        dist.broadcast_object_list(box, src=0)
        choice = box[0]
    return choice


def run_training(
    cfg: TrainHParams, *, out_dir: Path, stop_requested: Callable[[], bool]
) -> TrainResult:
    """One attempt of a training run on this rank: resume, train, and (rank 0) save outputs.

    The process group comes up inside TrainingArguments, from the RANK/WORLD_SIZE/MASTER_*
    variables the caller exported. Returns with ``preempted=True`` after the collective save
    when ``stop_requested`` became true on any rank.
    """
    import torch

    from cot.models import TORCH_DTYPES, load_model, load_tokenizer, pick_precision

    t0 = time.time()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = bool(torch.cuda.is_available())
    quantized, optim, note = resolve_quant_and_optim(cfg.quant, cfg.optim, cuda)
    if note and rank == 0:
        log.info(note)
    precision, precision_warning = pick_precision(cfg.precision, cuda=cuda)
    if precision_warning and rank == 0:
        log.warning(f"train: {precision_warning}")
    tokenizer = load_tokenizer(
        cfg.student, trust_remote_code=cfg.trust_remote_code, padding_side="right"
    )
    examples, stats = build_examples(
        tokenizer, read_training_records(cfg.data), cfg.max_length, cfg.overlong
    )
    if rank == 0:
        log.info(stats.describe(cfg.max_length))
    if not examples:
        raise InputError(f"{cfg.data}: no record fits --max-length {cfg.max_length}")
    outputs = TrainOutputs(out_dir)
    ckpt_root = outputs.checkpoints
    args = training_arguments(
        cfg,
        output_dir=ckpt_root,
        optim=optim,
        deepspeed=load_deepspeed_config(cfg.deepspeed),
        cuda=cuda,
        precision=precision,
    )
    _ = args.device  # brings the process group up now, before the ranks must agree on anything
    resume = _choose_resume(cfg.resume_from_checkpoint, ckpt_root)
    if rank == 0:
        what = f"resuming from {resume}" if resume else "starting from scratch"
        log.info(f"{what} (setup {time.time() - t0:.1f}s)")
    model = load_model(
        cfg.student,
        quant="nf4" if quantized else "none",
        trust_remote_code=cfg.trust_remote_code,
        device=f"cuda:{local_rank}" if cuda else "cpu",
        dtype=TORCH_DTYPES[precision],  # resolved above, where its notice was logged once
    )
    model = prepare_lora_model(
        model,
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        quantized=quantized,
        gradient_checkpointing=cfg.gradient_checkpointing,
        seed=cfg.seed,
    )
    callbacks = make_callbacks(
        checkpoint_root=ckpt_root,
        keep=cfg.save_total_limit,
        metrics_path=outputs.metrics,
        stop_requested=stop_requested,
        world_size=int(args.world_size),
    )
    env, env_note = reporter_env(cfg.report_to, outputs.dir, os.environ)
    if env_note and rank == 0:
        log.warning(f"train: {env_note}")
    with scoped_environ(env):  # read by the reporters' callbacks as they start
        trainer = build_trainer(model, tokenizer, examples, args, callbacks)
        trainer.train(resume_from_checkpoint=resume)
    preempted = callbacks[0].stopped_at is not None
    engine = engine_info(trainer)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result = TrainResult(
        preempted=preempted,
        global_step=int(trainer.state.global_step),
        resumed_from=resume,
        data={k: v for k, v in asdict(stats).items() if k != "overlong_lines"},
        engine=engine,
        seconds=round(time.time() - t0, 2),
        final_loss=float(losses[-1]) if losses else None,
        gpu_peak_mem_gb=peak_gpu_memory_gb(),
    )
    if rank == 0:
        atomic_write_text(outputs.engine, json.dumps(engine, indent=1))
        if not preempted:
            save_adapter_atomically(trainer.model, tokenizer, outputs.adapter)
            plot_metrics(outputs.metrics, outputs.loss_plot)
            atomic_write_text(outputs.summary, json.dumps(result.to_dict(), indent=1))
    barrier()
    return result
