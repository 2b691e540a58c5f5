"""The offline loader, the tiny-model builder and the tokenizer round trip."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import ClassVar

import pytest

from cot.models import (
    ModelError,
    check_model_dir,
    ensure_pad_token,
    load_model,
    load_tokenizer,
    resolve_quant,
)


def test_tokenizer_round_trip_ids_identical(tmp_path: Path, dataset_dir: Path) -> None:
    """Encode, save, reload through AutoTokenizer, encode again: ids must be identical."""
    from cot.models import train_tokenizer
    from cot.records import read_questions

    recs = read_questions(dataset_dir / "raw_questions.jsonl")
    texts = [r["question"] + "\n" + r["reference_cot"] for r in recs]
    tok = train_tokenizer(texts[:200])
    probe = [*texts[200:], "  Final Answer: 3/4\n\n", "x = -12.50 km/h (15 years old)", "é ü 日本"]
    before = [tok(t)["input_ids"] for t in probe]
    tok.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    again = load_tokenizer(tmp_path)
    after = [again(t)["input_ids"] for t in probe]
    assert before == after
    assert type(again).__name__ == "Qwen2Tokenizer"
    assert [again.decode(ids) for ids in after] == probe  # byte-level: lossless


def test_loader_offline_and_left_padding(
    tiny_models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # any network use would fail
    tok = load_tokenizer(tiny_models / "teacher")
    assert tok.padding_side == "left" and tok.pad_token is not None
    model = load_model(tiny_models / "teacher", quant="none")
    assert model.config.model_type == "qwen2" and not model.training


def test_pad_falls_back_to_eos(tiny_models: Path, tmp_path: Path) -> None:
    d = tmp_path / "m"
    shutil.copytree(tiny_models / "student", d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["pad_token"] = None
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(d)
    assert tok.pad_token == tok.eos_token


class _Tok:
    """The attributes ensure_pad_token reads: a tokenizer with token <-> id for two tokens."""

    ids: ClassVar[dict[str, int]] = {"<|endoftext|>": 7, "</s>": 2}

    def __init__(self, eos: str | None = None, eod_id: int | None = None, settable: bool = True):
        self.pad_token: str | None = None
        self._pad_id: int | None = None
        self.eos_token = eos
        self.settable = settable
        if eod_id is not None:
            self.eod_id = eod_id

    @property
    def pad_token_id(self) -> int | None:
        return self.ids.get(self.pad_token) if self.pad_token else self._pad_id  # type: ignore[arg-type]

    @pad_token_id.setter
    def pad_token_id(self, value: int) -> None:
        if not self.settable:
            raise AttributeError("can't set attribute")
        self._pad_id = value


def test_pad_token_from_eos_then_eod_id_then_a_clear_error() -> None:
    tok = _Tok(eos="</s>")
    ensure_pad_token(tok, "models/x")
    assert tok.pad_token == "</s>" and tok.pad_token_id == 2
    # First-generation Qwen: no eos token, only eod_id.
    qwen = _Tok(eod_id=7)
    ensure_pad_token(qwen, "models/qwen")
    assert qwen.pad_token_id == 7
    for bad in (_Tok(), _Tok(eod_id=7, settable=False)):
        with pytest.raises(ModelError, match=r"models/bad.*pad_token"):
            ensure_pad_token(bad, "models/bad")
    # A pad token that is already there is kept.
    keep = _Tok(eos="</s>")
    keep.pad_token = "<|endoftext|>"
    ensure_pad_token(keep, "models/x")
    assert keep.pad_token_id == 7


def test_missing_and_incomplete_model_folders(tiny_models: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="nope does not exist"):
        check_model_dir(tmp_path / "nope")
    d = tmp_path / "half"
    shutil.copytree(tiny_models / "student", d)
    for f in d.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelError, match=r"half is incomplete: missing weights"):
        load_model(d)
    (d / "config.json").unlink()
    with pytest.raises(ModelError, match=r"config\.json"):
        load_tokenizer(d)


def test_trust_remote_code_refused_unless_asked(tiny_models: Path, tmp_path: Path) -> None:
    d = tmp_path / "remote"
    shutil.copytree(tiny_models / "student", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="--trust-remote-code"):
        load_tokenizer(d)
    with pytest.raises(ModelError, match="--trust-remote-code"):
        load_model(d)


def test_quant_resolution_on_cpu() -> None:
    assert resolve_quant("none") is False
    assert resolve_quant("nf4") is True
    assert resolve_quant("auto") is False  # no CUDA on CI: full precision


def test_nf4_forced_on_cpu_loads_and_generates(tiny_models: Path) -> None:
    import torch

    tok = load_tokenizer(tiny_models / "teacher")
    model = load_model(tiny_models / "teacher", quant="nf4", device="cpu")
    assert getattr(model, "is_loaded_in_4bit", False) or any(
        "4bit" in type(m).__name__ for m in model.modules()
    )
    enc = tok(["What is 2 + 3?\n"], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > enc["input_ids"].shape[1] and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("fmt", ["raw", "chat"])
def test_tiny_teacher_writes_final_answer_lines(
    tiny_models: Path, dataset_dir: Path, fmt: str
) -> None:
    """The seed's prompt, raw or as a ChatML user turn: step-by-step text ending in the answer."""
    from cot.engines import prompt_text
    from cot.generation import generate_batch
    from cot.prompts import TEACHER_TEMPLATE, load_template, teacher_prompt
    from cot.records import read_questions

    qs = read_questions(dataset_dir / "test_questions.jsonl")[:16]
    tok = load_tokenizer(tiny_models / "teacher")
    model = load_model(tiny_models / "teacher", quant="none")
    t = load_template(TEACHER_TEMPLATE)
    ps = [prompt_text(tok, teacher_prompt(t, q["question"], fmt)) for q in qs]
    if fmt == "chat":
        assert ps[0].startswith("<|im_start|>user\nYou are a careful reasoning assistant.")
        assert ps[0].endswith("\n\nA:<|im_end|>\n<|im_start|>assistant\n")
    texts, _ = generate_batch(model, tok, ps, max_new_tokens=160, add_special_tokens=fmt == "raw")
    formatted = sum(
        x.strip().splitlines()[-1].startswith("Final Answer:") for x in texts if x.strip()
    )
    assert formatted >= 14, texts[:3]
    steps = sum(len(x.splitlines()) >= 2 for x in texts)
    assert steps >= 14, texts  # step-by-step, not one line


@pytest.mark.parametrize("can_exchange", [True, False])
def test_a_rebuild_that_fails_as_it_lands_keeps_the_previous_model(
    tmp_path: Path, dataset_dir: Path, monkeypatch: pytest.MonkeyPatch, can_exchange: bool
) -> None:
    """The old model is never deleted before the new one is in place: a failure at the last
    step (the rename) leaves it loadable, and no temp folder behind."""
    import os

    from cot import records
    from cot.models import build_tiny_models
    from cot.prompts import TEACHER_TEMPLATE, load_template
    from cot.records import read_questions

    recs = read_questions(dataset_dir / "raw_questions.jsonl")[:40]
    out = tmp_path / "tiny"
    kw = {
        "teacher_steps": 0,
        "student_steps": 0,
        "prompt_template": load_template(TEACHER_TEMPLATE),
    }
    build_tiny_models(out, recs, **kw)
    before = {p.name: p.read_bytes() for p in (out / "teacher").iterdir()}
    if can_exchange:

        def exchange(a: Path, b: Path) -> bool:
            raise OSError(5, "EIO (injected)")

        monkeypatch.setattr(records, "exchange", exchange, raising=False)
    else:
        monkeypatch.setattr(records, "exchange", lambda a, b: False, raising=False)
    real_replace = os.replace
    failed: list[object] = []

    def replace(src: object, dst: object) -> None:
        if str(dst) == str(out / "teacher") and not failed:  # the new model's rename, once
            failed.append(src)
            raise OSError(5, "Input/output error (injected)")
        real_replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match=r"EIO|injected"):
        build_tiny_models(out, recs, seed=1, **kw)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (out / "teacher").iterdir()} == before
    assert sorted(p.name for p in out.iterdir()) == ["student", "teacher"]
    load_tokenizer(out / "teacher")


# --------------------------------------------------------------------------- precision

# Every (--precision, CUDA present, GPU has native bf16) case and what it resolves to.
PRECISION_MATRIX = {
    ("auto", True, True): "bf16",
    ("auto", True, False): "fp16",  # V100/T4: fp16 mixed precision, not fp32
    ("auto", False, True): "fp32",
    ("auto", False, False): "fp32",
    ("bf16", True, True): "bf16",
    ("bf16", True, False): "bf16",  # asked for: kept (emulated), with a notice
    ("bf16", False, True): "fp32",
    ("bf16", False, False): "fp32",
    ("fp16", True, True): "fp16",
    ("fp16", True, False): "fp16",
    ("fp16", False, True): "fp32",
    ("fp16", False, False): "fp32",
    ("fp32", True, True): "fp32",
    ("fp32", True, False): "fp32",
    ("fp32", False, True): "fp32",
    ("fp32", False, False): "fp32",
}


@pytest.mark.parametrize(
    ("case", "want"),
    sorted(PRECISION_MATRIX.items()),
    ids=[
        f"{p}-{'cuda' if c else 'cpu'}-{'bf16' if b else 'nobf16'}"
        for p, c, b in sorted(PRECISION_MATRIX)
    ],
)
def test_precision_resolves_over_the_whole_matrix(case: tuple[str, bool, bool], want: str) -> None:
    from cot.models import precision_note, resolve_precision

    precision, cuda, bf16_ok = case
    got = resolve_precision(precision, cuda=cuda, bf16_ok=bf16_ok)
    assert got == want
    note = precision_note(precision, cuda=cuda, bf16_ok=bf16_ok)
    # A notice exactly where an explicit choice is not what runs natively, one line each.
    explicit_fallback = precision in ("bf16", "fp16") and not cuda
    emulated = precision == "bf16" and cuda and not bf16_ok
    assert (note is not None) == (explicit_fallback or emulated)
    if note is not None:
        assert "\n" not in note and precision in note
        assert ("fp32" in note) == explicit_fallback


def test_unknown_precision_is_refused() -> None:
    from cot.errors import InputError
    from cot.models import resolve_precision

    with pytest.raises(InputError, match=r"precision must be auto, bf16, fp16 or fp32"):
        resolve_precision("fp8", cuda=True, bf16_ok=True)


class _Loaded:
    """What a patched from_pretrained returns: records where it was moved."""

    def __init__(self) -> None:
        self.moved_to: str | None = None

    def to(self, device: str) -> _Loaded:
        self.moved_to = device
        return self

    def eval(self) -> _Loaded:
        return self


@pytest.fixture()
def from_pretrained_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    """The keyword arguments of every AutoModelForCausalLM.from_pretrained call (none loads)."""
    from transformers import AutoModelForCausalLM

    calls: list[dict[str, object]] = []

    def fake(path: str, **kwargs: object) -> _Loaded:
        calls.append(kwargs)
        return _Loaded()

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake)
    return calls


def _gpu(monkeypatch: pytest.MonkeyPatch, *, bf16: bool) -> None:
    """Pretend this machine has a CUDA GPU, with or without native bf16 (a V100 has none)."""
    import cot.models as M

    monkeypatch.setattr(M, "cuda_available", lambda: True)
    monkeypatch.setattr(M, "bf16_supported", lambda: bf16, raising=False)


def test_auto_precision_loads_fp16_on_a_gpu_without_bf16(
    tiny_models: Path, monkeypatch: pytest.MonkeyPatch, from_pretrained_calls: list[dict]
) -> None:
    import torch

    _gpu(monkeypatch, bf16=False)
    load_model(tiny_models / "student", quant="none")
    assert from_pretrained_calls[-1]["dtype"] == torch.float16
    # NF4's compute dtype follows the same choice.
    load_model(tiny_models / "student", quant="nf4")
    kw = from_pretrained_calls[-1]
    assert kw["dtype"] == torch.float16
    assert kw["quantization_config"].bnb_4bit_compute_dtype == torch.float16  # type: ignore[attr-defined]
    _gpu(monkeypatch, bf16=True)
    load_model(tiny_models / "student", quant="nf4")
    kw = from_pretrained_calls[-1]
    assert kw["dtype"] == torch.bfloat16
    assert kw["quantization_config"].bnb_4bit_compute_dtype == torch.bfloat16  # type: ignore[attr-defined]


def test_explicit_precision_and_dtype_reach_the_loader(
    tiny_models: Path, monkeypatch: pytest.MonkeyPatch, from_pretrained_calls: list[dict]
) -> None:
    import torch

    _gpu(monkeypatch, bf16=True)
    for precision, want in (("fp32", torch.float32), ("fp16", torch.float16)):
        load_model(tiny_models / "student", quant="none", precision=precision)
        assert from_pretrained_calls[-1]["dtype"] == want
    # The older dtype= keyword still wins where a caller passes it.
    load_model(tiny_models / "student", quant="none", precision="fp16", dtype="float32")
    assert from_pretrained_calls[-1]["dtype"] == torch.float32


def test_fp16_on_cpu_loads_fp32_with_a_one_line_notice(
    tiny_models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    capsys.readouterr()
    model = load_model(tiny_models / "student", quant="none", device="cpu", precision="fp16")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    err = [line for line in capsys.readouterr().err.splitlines() if "precision" in line]
    assert len(err) == 1 and "fp16" in err[0] and "fp32" in err[0], err
