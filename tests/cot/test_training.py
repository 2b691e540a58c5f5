"""Unit tests of cot.training: loss mask, length grouping, records, checkpoints, settings.

All but the last test run in well under a second each; the last (``slow``) trains the tiny
student in this process, stops it by request mid-run, resumes, and compares the adapter with an
uninterrupted run, with no scheduler involved.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest

from cot import training as T
from cot.prompts import student_prompt
from cot.records import RecordError

REPO = Path(__file__).resolve().parents[2]
STUDENT = REPO / "models" / "tiny" / "student"


@pytest.fixture(scope="module")
def tok(tiny_models: Path) -> Any:
    from cot.models import load_tokenizer

    return load_tokenizer(STUDENT, padding_side="right")


# --------------------------------------------------------------------------- loss mask


def test_answer_mask_from_offsets() -> None:
    # prompt is 10 chars; a special token (0, 0), prompt tokens, one straddling token, answer.
    offsets = [(0, 0), (0, 4), (4, 10), (8, 12), (10, 14), (14, 15)]
    assert T.answer_mask(offsets, 10) == [False, False, False, False, True, True]


def _label_text(tok: Any, ex: dict[str, Any]) -> str:
    ids = [t for t in ex["labels"] if t != T.IGNORE_INDEX]
    return str(tok.decode(ids))


def test_loss_falls_on_answer_tokens_only(tok: Any) -> None:
    question, cot = "What is 6 * 6 - 3?", "Multiply first: 6 * 6 = 36.\nFinal Answer: 33"
    ex, status = T.encode_example(tok, question, cot, max_length=512)
    assert status == "ok" and ex is not None
    prompt_ids = tok(student_prompt(question))["input_ids"]
    n_prompt = len(prompt_ids)
    # The sequence starts with exactly the prompt's tokens, and not one of them is trained on.
    assert ex["input_ids"][:n_prompt] == prompt_ids
    assert all(t == T.IGNORE_INDEX for t in ex["labels"][:n_prompt])
    # Every answer token is trained on, and the trained text is the answer plus EOS: this fails
    # if a single prompt token (even the "\n" before the answer) were included.
    assert all(t != T.IGNORE_INDEX for t in ex["labels"][n_prompt:])
    assert _label_text(tok, ex) == cot + tok.eos_token
    assert ex["labels"][-1] == tok.eos_token_id and ex["input_ids"][-1] == tok.eos_token_id
    assert ex["length"] == len(ex["input_ids"]) == len(ex["labels"])


def test_mask_ignores_marker_text_inside_the_question(tok: Any) -> None:
    # A marker search would stop at the first "### Answer:", inside the question itself.
    question = "Copy this: ### Answer: 7. Now what is 2 + 2?"
    cot = "2 + 2 = 4.\nFinal Answer: 4"
    ex, _ = T.encode_example(tok, question, cot, max_length=512)
    assert ex is not None
    assert _label_text(tok, ex) == cot + tok.eos_token


class _SlowTok:
    """A tokenizer without offsets: one id per character."""

    is_fast = False
    eos_token_id = 1

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}


def test_slow_tokenizer_masks_by_prompt_token_count() -> None:
    ex, _ = T.encode_example(_SlowTok(), "q?", "ab", max_length=100)
    assert ex is not None
    n_prompt = len(student_prompt("q?"))
    assert ex["labels"] == [T.IGNORE_INDEX] * n_prompt + [ord("a"), ord("b"), 1]


def test_overlong_records_are_truncated_or_dropped_and_counted(tok: Any) -> None:
    short = {"question": "What is 1 + 1?", "cot": "1 + 1 = 2.\nFinal Answer: 2", "line": 1}
    long_ = {"question": "What is 2 + 2?", "cot": "2 + 2 = 4. " * 40, "line": 2}
    huge_prompt = {"question": "x " * 300, "cot": "ok", "line": 3}
    recs = [short, long_, huge_prompt]
    ex, stats = T.build_examples(tok, recs, max_length=64, overlong="truncate")
    assert [e["length"] for e in ex][1] == 64
    assert (stats.kept, stats.truncated, stats.dropped_no_answer) == (2, 1, 1)
    assert stats.overlong_lines == [2, 3]
    assert "over --max-length 64 (lines 2, 3)" in stats.describe(64)
    ex, stats = T.build_examples(tok, recs, max_length=64, overlong="drop")
    assert (stats.kept, stats.dropped_overlong, stats.overlong_lines) == (1, 2, [2, 3])
    assert max(e["length"] for e in ex) <= 64


def test_pad_collator_pads_right_with_ignored_labels() -> None:
    feats = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "length": 3},
        {"input_ids": [5], "labels": [5], "length": 1},
    ]
    b = T.PadCollator(pad_token_id=0)(feats)
    assert b["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert T.PadCollator(0, pad_to=5)(feats)["input_ids"].shape == (2, 5)


# --------------------------------------------------------------------------- length grouping


def test_grouped_order_is_a_seeded_permutation() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(20, 200) for _ in range(500)]
    a = T.grouped_order(lengths, 8, seed=1, epoch=0)
    assert sorted(a) == list(range(500))
    assert a == T.grouped_order(lengths, 8, seed=1, epoch=0)
    assert a != T.grouped_order(lengths, 8, seed=1, epoch=1)
    assert a != T.grouped_order(lengths, 8, seed=2, epoch=0)
    sampler = T.LengthGroupedSampler(lengths, 8, seed=1)
    sampler.set_epoch(1)
    assert list(sampler) == T.grouped_order(lengths, 8, seed=1, epoch=1)
    assert len(sampler) == 500


def test_length_grouping_keeps_padding_small() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(40, 400) for _ in range(2000)]
    grouped = T.non_pad_fraction(lengths, T.grouped_order(lengths, 8, seed=0), 8)
    shuffled = list(range(len(lengths)))
    rng.shuffle(shuffled)
    random_order = T.non_pad_fraction(lengths, shuffled, 8)
    padded_to_max = T.non_pad_fraction(lengths, shuffled, 8, pad_to=1024)
    assert grouped >= 0.9, grouped
    assert random_order < 0.75 and padded_to_max < 0.25


# --------------------------------------------------------------------------- records


def _write(tmp_path: Path, lines: list[str]) -> Path:
    p = tmp_path / "train.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


GOOD = json.dumps({"question": "q", "cot": "c"})


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("{not json", "invalid JSON"),
        (json.dumps({"cot": "c"}), "field 'question': missing"),
        (json.dumps({"question": "q"}), "field 'cot': missing"),
        (json.dumps({"question": 3, "cot": "c"}), "field 'question': must be a string, got int"),
        (json.dumps({"question": "q", "cot": None}), "field 'cot': must be a string, got NoneType"),
        (json.dumps({"question": "q", "cot": "  "}), "field 'cot': must not be empty"),
        (json.dumps(["q", "c"]), "expected a JSON object"),
    ],
)
def test_malformed_records_name_file_and_line(tmp_path: Path, bad: str, message: str) -> None:
    path = _write(tmp_path, [GOOD, "", bad, GOOD])
    with pytest.raises(RecordError) as err:
        T.read_training_records(path)
    assert str(err.value).startswith(f"{path}:3: ")
    assert message in str(err.value)


def test_records_keep_line_numbers_and_empty_file_fails(tmp_path: Path) -> None:
    recs = T.read_training_records(_write(tmp_path, [GOOD, "", GOOD]))
    assert [r["line"] for r in recs] == [1, 3]
    with pytest.raises(RecordError, match="empty"):
        T.read_training_records(_write(tmp_path, [""]))


def test_error_records_are_skipped_and_all_errors_fail(tmp_path: Path) -> None:
    err = json.dumps({"question": "q", "cot": None, "error": "prompt too long: ..."})
    recs = T.read_training_records(_write(tmp_path, [GOOD, err, GOOD]))
    assert [r["line"] for r in recs] == [1, 3]
    with pytest.raises(RecordError, match="all 2 records are error records: no records to train"):
        T.read_training_records(_write(tmp_path, [err, err]))


# --------------------------------------------------------------------------- checkpoints


def _ckpt(root: Path, step: int, *, complete: bool = True) -> Path:
    c = root / f"checkpoint-{step}"
    (c / f"global_step{step}").mkdir(parents=True)
    (c / "adapter_model.safetensors").write_bytes(b"x" * (100 + step))
    (c / f"global_step{step}" / "optim_states.pt").write_bytes(b"y" * 50)
    (c / "trainer_state.json").write_text("{}")
    if complete:
        T.write_checkpoint_marker(c, step, world_size=2)
    return c


def test_latest_complete_checkpoint_skips_torn_ones(tmp_path: Path) -> None:
    assert T.latest_complete_checkpoint(tmp_path) is None
    _ckpt(tmp_path, 5)
    c10 = _ckpt(tmp_path, 10)
    _ckpt(tmp_path, 9)  # numeric, not lexical, order: 10 beats 9
    assert T.latest_complete_checkpoint(tmp_path) == c10
    _ckpt(tmp_path, 15, complete=False)  # killed before its marker
    assert T.latest_complete_checkpoint(tmp_path) == c10
    c20 = _ckpt(tmp_path, 20)
    (c20 / "global_step20" / "optim_states.pt").unlink()  # files deleted after the marker
    c25 = _ckpt(tmp_path, 25)
    (c25 / "adapter_model.safetensors").write_bytes(b"short")  # truncated file
    c30 = _ckpt(tmp_path, 30)
    (c30 / T.CHECKPOINT_MARKER).write_text("{torn")  # torn marker
    assert T.latest_complete_checkpoint(tmp_path) == c10
    (tmp_path / "checkpoint-x").mkdir()  # not a checkpoint name
    steps = [T.checkpoint_step(p) for p in T.list_checkpoints(tmp_path)]
    assert steps == [5, 9, 10, 15, 20, 25, 30]
    assert T.torn_after(tmp_path, 10) == [tmp_path / f"checkpoint-{s}" for s in (15, 20, 25, 30)]


def test_choose_resume_takes_the_one_before_a_torn_newest_and_removes_it(
    tmp_path: Path,
) -> None:
    c5 = _ckpt(tmp_path, 5)
    c10 = _ckpt(tmp_path, 10, complete=False)  # the newest: killed before its marker
    assert T._choose_resume(None, tmp_path) == str(c5)
    assert c5.is_dir() and not c10.exists()
    assert T._choose_resume(None, tmp_path / "none") is None


def test_answer_mask_at_the_exact_seam() -> None:
    # The prompt is 10 characters: a token starting at 10 is the first answer token, a token
    # ending at 10 is the last prompt token, and one that straddles 9..11 stays with the prompt.
    assert T.answer_mask([(8, 10), (10, 12)], 10) == [False, True]
    assert T.answer_mask([(7, 9), (9, 11), (11, 12)], 10) == [False, False, True]
    assert T.answer_mask([(0, 0), (10, 10), (10, 11)], 10) == [False, False, True]


def test_marker_lists_files_and_refuses_empty(tmp_path: Path) -> None:
    c = _ckpt(tmp_path, 3)
    data = json.loads((c / T.CHECKPOINT_MARKER).read_text())
    assert data["step"] == 3 and data["world_size"] == 2
    assert set(data["files"]) == {
        "adapter_model.safetensors",
        "trainer_state.json",
        os.path.join("global_step3", "optim_states.pt"),
    }
    (tmp_path / "checkpoint-4").mkdir()
    with pytest.raises(ValueError, match="empty"):
        T.write_checkpoint_marker(tmp_path / "checkpoint-4", 4)


def test_rotation_keeps_last_k_complete(tmp_path: Path) -> None:
    for s in (2, 4, 6, 8):
        _ckpt(tmp_path, s)
    _ckpt(tmp_path, 5, complete=False)  # torn, older than the newest complete: garbage
    _ckpt(tmp_path, 10, complete=False)  # newer than the newest complete: left alone
    gone = T.rotate_checkpoints(tmp_path, keep=2)
    assert sorted(T.checkpoint_step(p) or 0 for p in gone) == [2, 4, 5]
    assert [T.checkpoint_step(p) for p in T.list_checkpoints(tmp_path)] == [6, 8, 10]
    assert T.rotate_checkpoints(tmp_path, keep=2) == []
    assert T.checkpoints_to_delete(tmp_path / "nothing", keep=1) == []


# --------------------------------------------------------------------------- settings


def test_quant_and_optim_fall_back_on_cpu_in_one_line() -> None:
    assert T.resolve_quant_and_optim("auto", "auto", cuda=True) == (True, "paged_adamw_8bit", None)
    nf4, optim, note = T.resolve_quant_and_optim("auto", "auto", cuda=False)
    assert (nf4, optim) == (False, "adamw_torch")
    assert note is not None and "\n" not in note
    assert "NF4" in note and "paged_adamw_8bit" in note
    # Forced on CPU: the GPU path, no fallback line.
    assert T.resolve_quant_and_optim("nf4", "paged_adamw_8bit", cuda=False) == (
        True,
        "paged_adamw_8bit",
        None,
    )
    assert T.resolve_quant_and_optim("none", "adamw_torch", cuda=True) == (
        False,
        "adamw_torch",
        None,
    )


def _gpu(monkeypatch: pytest.MonkeyPatch, *, bf16: bool) -> None:
    """Pretend the GPU has (or, like a V100, lacks) native bf16; TrainingArguments itself
    checks bf16 against the hardware, so its probe follows."""
    import transformers.training_args as targs

    import cot.models as M

    monkeypatch.setattr(M, "bf16_supported", lambda: bf16, raising=False)
    monkeypatch.setattr(targs, "is_torch_bf16_gpu_available", lambda: bf16)


@pytest.mark.parametrize(
    ("precision", "cuda", "bf16", "want"),
    [
        ("auto", True, False, "fp16"),  # a GPU without bf16: fp16 mixed precision, not fp32
        ("auto", True, True, "bf16"),
        ("auto", False, False, "fp32"),
        ("fp16", False, False, "fp32"),  # no CUDA: fp32 whatever was asked
        ("fp32", True, True, "fp32"),
        ("fp16", True, True, "fp16"),
    ],
)
def test_trainer_mixed_precision_follows_the_loader_choice(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    precision: str,
    cuda: bool,
    bf16: bool,
    want: str,
) -> None:
    _gpu(monkeypatch, bf16=bf16)
    from cot.models import pick_precision

    over = {} if precision == "auto" else {"precision": precision}
    chosen, _ = pick_precision(precision, cuda=cuda)  # what run_training decides, once
    args = T.training_arguments(
        _cfg(tmp_path / "d.jsonl", **over),
        output_dir=tmp_path,
        optim="adamw_torch",
        deepspeed=None,
        cuda=cuda,
        precision=chosen,
    )
    ran = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    assert ran == want
    from cot.models import resolve_precision

    assert ran == resolve_precision(precision, cuda=cuda, bf16_ok=bf16)  # the loader's choice


def test_lora_config_and_only_lora_weights_trainable(tiny_models: Path) -> None:
    """The tiny student wrapped exactly as run_training wraps it, with the default settings."""
    from cot.models import load_model

    cfg = T.TrainHParams(student=str(STUDENT), data="unused.jsonl")
    model = T.prepare_lora_model(
        load_model(STUDENT, quant="none", device="cpu"),
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        quantized=False,
        gradient_checkpointing=False,
        seed=cfg.seed,
    )
    lora = model.peft_config["default"]
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (8, 16, 0.05)
    six = {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"}
    assert set(lora.target_modules) == six and set(T.LORA_TARGETS) == six
    # Every target exists in the student and got an adapter: 6 per layer, 2 layers.
    wrapped = [n for n, m in model.named_modules() if hasattr(m, "lora_A")]
    assert {n.rsplit(".", 1)[-1] for n in wrapped} == six and len(wrapped) == 12
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable), trainable
    assert len(trainable) == 24  # A and B of each wrapped module, nothing else
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert not any("lora_" in n for n in frozen)


def test_fp16_base_keeps_lora_weights_in_fp32(tiny_models: Path) -> None:
    """HF Trainer's fp16 GradScaler refuses to unscale fp16 gradients: adapters train in fp32."""
    import torch

    from cot.models import load_model

    base = load_model(STUDENT, quant="none", device="cpu", dtype="float16")
    model = T.prepare_lora_model(
        base, r=8, lora_alpha=16, lora_dropout=0.05, quantized=False,
        gradient_checkpointing=False, seed=0,
    )  # fmt: skip
    params = dict(model.named_parameters())
    assert {p.dtype for p in params.values() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in params.values() if not p.requires_grad} == {torch.float16}


def test_reporter_environment(tmp_path: Path) -> None:
    out = tmp_path / "train"
    assert T.reporter_env("none", out, {}) == ({}, None)
    env, note = T.reporter_env("tensorboard", out, {})
    assert env == {"TENSORBOARD_LOGGING_DIR": str(out / "tensorboard")} and note is None
    env, note = T.reporter_env("wandb", out, {})
    assert env["WANDB_MODE"] == "offline" and env["WANDB_DIR"] == str(out)
    assert note is None
    # An online request from the user's environment is overridden, in one line.
    env, note = T.reporter_env("wandb", out, {"WANDB_MODE": "online"})
    assert env["WANDB_MODE"] == "offline"
    assert note is not None and "\n" not in note and "online" in note and "offline" in note
    # Already offline, or switched off altogether: left as it is.
    for mode in ("offline", "disabled"):
        env, note = T.reporter_env("wandb", out, {"WANDB_MODE": mode})
        assert "WANDB_MODE" not in env and note is None


def test_deepspeed_template_and_config_loading(tmp_path: Path) -> None:
    raw = json.loads((REPO / "templates" / "ds_zero2.json").read_text())
    assert "python -m hpc.launch train" in raw["_comment"]
    ds = T.load_deepspeed_config(REPO / "templates" / "ds_zero2.json")
    assert ds is not None and "_comment" not in ds
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["train_micro_batch_size_per_gpu"] == "auto"
    assert ds["gradient_accumulation_steps"] == "auto"
    for off in (None, "", "null"):
        assert T.load_deepspeed_config(off) is None
    bad = tmp_path / "ds.json"
    bad.write_text('{\n  "zero_optimization": {,}\n}')
    with pytest.raises(ValueError, match=rf"{bad}:2: invalid JSON"):
        T.load_deepspeed_config(bad)
    with pytest.raises(ValueError, match="not found"):
        T.load_deepspeed_config(tmp_path / "missing.json")


def test_metrics_truncate_and_plot(tmp_path: Path) -> None:
    m = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 5.0 - s / 10} for s in (1, 5, 10, 15)]
    m.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 20, "lo')
    assert [r["step"] for r in T.read_metrics(m)] == [1, 5, 10, 15]
    T.truncate_metrics(m, 10)  # a resume from step 10 logs 15 again
    assert [r["step"] for r in T.read_metrics(m)] == [1, 5, 10]
    png = T.plot_metrics(m, tmp_path / "training_loss.png")
    assert png is not None and png.read_bytes()[:4] == b"\x89PNG"
    assert T.plot_metrics(tmp_path / "none.jsonl", tmp_path / "x.png") is None


# --------------------------------------------------------------------------- in-process training


def _cfg(data: Path, **over: Any) -> T.TrainHParams:
    cfg = {
        "student": str(STUDENT),
        "data": str(data),
        "epochs": 1.0,
        "max_steps": 20,
        "lr": 1.0e-3,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "max_length": 96,
        "overlong": "truncate",
        "quant": "none",
        "optim": "adamw_torch",
        "deepspeed": None,
        "save_steps": 4,
        "save_total_limit": 2,
        "logging_steps": 1,
        "gradient_checkpointing": False,
        "resume_from_checkpoint": None,
        "trust_remote_code": False,
        "seed": 3,
    }
    cfg.update(over)
    return T.TrainHParams(**cfg)


@pytest.mark.slow
def test_stop_request_saves_and_resume_matches_uninterrupted(tok: Any, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    data = tmp_path / "train.jsonl"
    rng = random.Random(0)
    with open(data, "w") as fh:
        for _ in range(32):  # 8 steps per epoch: the run crosses two epoch boundaries
            a, b = rng.randint(1, 50), rng.randint(1, 50)
            cot = f"Add: {a} + {b} = {a + b}.\nFinal Answer: {a + b}"
            fh.write(json.dumps({"question": f"What is {a} + {b}?", "cot": cot}) + "\n")
    ref = T.run_training(_cfg(data), out_dir=tmp_path / "ref", stop_requested=lambda: False)
    assert not ref.preempted and ref.global_step == 20
    assert ref.engine["zero_stage"] is None and not ref.engine["deepspeed"]

    calls = {"n": 0}

    def stop_mid_second_epoch() -> bool:
        calls["n"] += 1
        return calls["n"] >= 11

    out = tmp_path / "cut"
    first = T.run_training(_cfg(data), out_dir=out, stop_requested=stop_mid_second_epoch)
    assert first.preempted and first.global_step == 11
    assert T.latest_complete_checkpoint(out / "checkpoints") == out / "checkpoints/checkpoint-11"
    assert not (out / "adapter").exists()
    # The resume lands 3 steps into epoch 1: it must replay exactly epoch 1's batch order.
    second = T.run_training(_cfg(data), out_dir=out, stop_requested=lambda: False)
    assert second.resumed_from == str(out / "checkpoints" / "checkpoint-11")
    assert not second.preempted and second.global_step == 20
    a = load_file(str(tmp_path / "ref" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    assert (out / "adapter" / "adapter_config.json").exists()
    assert (out / "adapter" / "tokenizer.json").exists()
    steps = [r["step"] for r in T.read_metrics(out / "metrics.jsonl")]
    assert steps == list(range(1, 21))  # no step logged twice across the resume
    assert (out / "training_loss.png").exists()


def test_tensorboard_event_files_land_in_the_output_folder(
    tok: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real 2-step CPU training with report_to=tensorboard: event files under
    ``<out_dir>/tensorboard/`` with the loss in them, nothing in the current folder, and
    metrics.jsonl and the loss plot as always."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = os.environ.get("TENSORBOARD_LOGGING_DIR")
    data = tmp_path / "train.jsonl"
    with open(data, "w") as fh:
        for a in range(1, 9):
            cot = f"Add: {a} + 1 = {a + 1}.\nFinal Answer: {a + 1}"
            fh.write(json.dumps({"question": f"What is {a} + 1?", "cot": cot}) + "\n")
    out = tmp_path / "out"
    cfg = _cfg(data, max_steps=2, save_steps=100, report_to="tensorboard")
    res = T.run_training(cfg, out_dir=out, stop_requested=lambda: False)
    assert res.global_step == 2
    events = sorted(out.rglob("events.out.tfevents.*"))
    assert events, sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert all(e.parent == out / "tensorboard" for e in events), events
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [s.step for s in acc.Scalars("train/loss")] == [1, 2]
    assert list(cwd.iterdir()) == []  # no runs/ folder wherever the job happened to start
    assert os.environ.get("TENSORBOARD_LOGGING_DIR") == before  # scoped to the training
    assert [r["step"] for r in T.read_metrics(out / "metrics.jsonl")] == [1, 2]
    assert (out / "training_loss.png").exists()


def test_two_adapter_saves_at_once_never_mix_or_fail(tmp_path: Path) -> None:
    """Two trainings saving into one out_dir (the item-2 race) each get their own temp folder:
    both saves succeed and the adapter is wholly one of them, never a mix."""
    import threading

    both_writing = threading.Barrier(2, timeout=10)

    class Fake:
        def __init__(self, who: str) -> None:
            self.who = who

        def save_pretrained(self, folder: str) -> None:
            Path(folder, "adapter_model.safetensors").write_text(self.who)
            both_writing.wait()  # both are mid-save here
            Path(folder, "adapter_config.json").write_text(self.who)

    class FakeTok:
        def __init__(self, who: str) -> None:
            self.who = who

        def save_pretrained(self, folder: str) -> None:
            Path(folder, "tokenizer.json").write_text(self.who)

    dest = tmp_path / "train" / "adapter"
    errors: list[BaseException] = []

    def save(who: str) -> None:
        try:
            T.save_adapter_atomically(Fake(who), FakeTok(who), dest)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=save, args=(w,)) for w in ("first", "second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    contents = {p.name: p.read_text() for p in dest.iterdir()}
    assert set(contents) == {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"}
    assert len(set(contents.values())) == 1, contents  # one writer's files, all of them
    assert sorted(p.name for p in dest.parent.iterdir()) == ["adapter"]
