"""The one offline loader for tokenizers and models, and the tiny-model builder.

Every load passes ``local_files_only=True``: compute nodes are air-gapped, so a model folder is
downloaded once on a login node (``hpc.launch download``) and only ever read afterwards.
torch and transformers are imported inside functions so the CLI starts instantly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cot.errors import InputError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
# The tiny tokenizer's special tokens: Qwen's eos and its ChatML turn markers.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


class ModelError(InputError):
    """A model folder is missing, incomplete or needs a flag the user did not give."""


def check_model_dir(path: str | Path, *, need_weights: bool = True) -> Path:
    """Return ``path`` resolved, or raise ModelError naming the folder and what is missing."""
    p = Path(path)
    if not p.exists():
        raise ModelError(
            f"model folder {p} does not exist (build tiny models with "
            "`python -m hpc.launch tiny-models` or fetch real ones with `download` on a login node)"
        )
    if not p.is_dir():
        raise ModelError(f"model folder {p} is not a directory")
    missing = []
    if not (p / "config.json").is_file():
        missing.append("config.json")
    if need_weights and not any(any(p.glob(pat)) for pat in WEIGHT_PATTERNS):
        missing.append("weights (*.safetensors or pytorch_model*.bin)")
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        missing.append("tokenizer files (tokenizer.json or tokenizer_config.json)")
    if missing:
        raise ModelError(f"model folder {p} is incomplete: missing {', '.join(missing)}")
    return p.resolve()


def check_adapter_dir(path: str | Path) -> Path:
    """Return a LoRA adapter folder, or raise ModelError naming it and what is missing."""
    p = Path(path)
    if not p.is_dir():
        raise ModelError(f"adapter folder {p} does not exist (train one with `hpc.launch train`)")
    missing = [f for f in ("adapter_config.json",) if not (p / f).is_file()]
    if not any(p.glob("adapter_model.*")):
        missing.append("adapter_model.safetensors")
    if missing:
        raise ModelError(f"adapter folder {p} is incomplete: missing {', '.join(missing)}")
    return p.resolve()


def check_remote_code(path: Path, trust_remote_code: bool) -> None:
    """Refuse a model that ships its own code unless the user asked for it by flag."""
    cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if cfg.get("auto_map") and not trust_remote_code:
        raise ModelError(
            f"model folder {path} ships its own Python code (auto_map in config.json); "
            "refusing to run it without --trust-remote-code"
        )


def cuda_available() -> bool:
    """True when torch sees a CUDA device."""
    import torch

    return bool(torch.cuda.is_available())


PRECISIONS = ("auto", "bf16", "fp16", "fp32")
TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def bf16_supported() -> bool:
    """True when the current CUDA device computes in bf16 natively (Ampere and newer).

    torch's own check counts emulated bf16 as support by default, so a V100 would pass it.
    """
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch before 2.3 has no such argument and does not count emulation
        return bool(torch.cuda.is_bf16_supported())


def resolve_precision(precision: str, *, cuda: bool, bf16_ok: bool) -> str:
    """What ``--precision`` means on this machine: ``bf16``, ``fp16`` or ``fp32``.

    ``auto`` is bf16 where the GPU has it natively, fp16 on other CUDA GPUs and fp32 without
    CUDA. An explicit bf16 or fp16 is kept on any CUDA GPU and becomes fp32 without one. The
    loader's weight dtype and the Trainer's mixed precision both come from here.

    Raises:
        InputError: ``precision`` is not one of :data:`PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise InputError(f"precision must be auto, bf16, fp16 or fp32, got {precision!r}")
    if not cuda:
        return "fp32"
    if precision == "auto":
        return "bf16" if bf16_ok else "fp16"
    return precision


def precision_note(precision: str, *, cuda: bool, bf16_ok: bool) -> str | None:
    """One line for the log where an explicit choice does not run as asked, else None."""
    if precision in ("bf16", "fp16") and not cuda:
        return f"precision {precision}: no CUDA device, running in fp32 instead"
    if precision == "bf16" and cuda and not bf16_ok:
        return (
            "precision bf16: this GPU has no native bf16, so it is emulated (slowly); "
            "--precision auto would use fp16"
        )
    return None


def pick_precision(precision: str, *, cuda: bool) -> tuple[str, str | None]:
    """:func:`resolve_precision` for this machine's GPU, with its :func:`precision_note`."""
    bf16_ok = cuda and bf16_supported()
    return (
        resolve_precision(precision, cuda=cuda, bf16_ok=bf16_ok),
        precision_note(precision, cuda=cuda, bf16_ok=bf16_ok),
    )


def resolve_quant(quant: str) -> bool:
    """Whether to load in 4-bit NF4: ``nf4`` always, ``none`` never, ``auto`` only with CUDA."""
    if quant == "nf4":
        return True
    if quant == "none":
        return False
    if quant != "auto":
        raise InputError(f"quant must be auto, nf4 or none, got {quant!r}")
    if cuda_available():
        return True
    log.info("quant=auto: no CUDA device, loading in full precision instead of NF4")
    return False


def load_tokenizer(
    path: str | Path, *, trust_remote_code: bool = False, padding_side: str = "left"
) -> PreTrainedTokenizerBase:
    """Load a tokenizer offline; the pad token falls back to eos. Left padding for generation."""
    from transformers import AutoTokenizer

    p = check_model_dir(path, need_weights=False)
    check_remote_code(p, trust_remote_code)
    tok = AutoTokenizer.from_pretrained(
        str(p), local_files_only=True, trust_remote_code=trust_remote_code
    )
    ensure_pad_token(tok, p)
    tok.padding_side = padding_side
    return tok


def ensure_pad_token(tok: Any, where: str | Path) -> None:
    """Give a tokenizer without a pad token one: its eos, else its ``eod_id`` (first-generation
    Qwen's remote-code tokenizer has no eos token, only ``eod_id`` for ``<|endoftext|>``).

    Raises:
        ModelError: neither exists, or the tokenizer refuses the id; the message says what to set.
    """
    if tok.pad_token_id is not None:
        return
    if tok.eos_token is not None:
        tok.pad_token = tok.eos_token
        return
    eod = getattr(tok, "eod_id", None)
    if isinstance(eod, int):
        with contextlib.suppress(AttributeError, ValueError, TypeError):
            tok.pad_token_id = eod
        if tok.pad_token_id == eod:
            log.info("tokenizer in %s has no pad or eos token: padding with eod_id %d", where, eod)
            return
    raise ModelError(
        f"tokenizer in {where} has no pad token, no eos token and no usable eod_id: set "
        '"pad_token" (for example "<|endoftext|>") in its tokenizer_config.json'
    )


def load_model(
    path: str | Path,
    *,
    quant: str = "auto",
    trust_remote_code: bool = False,
    device: str | None = None,
    precision: str = "auto",
    dtype: str | None = None,
) -> PreTrainedModel:
    """Load a causal LM offline.

    Args:
        path: model folder (config, weights, tokenizer).
        quant: ``auto`` (NF4 only where CUDA is present), ``nf4`` or ``none``.
        trust_remote_code: allow code shipped in the folder (off unless asked for).
        device: ``cuda``/``cpu``; default picks CUDA when present.
        precision: ``auto``/``bf16``/``fp16``/``fp32`` (see :func:`resolve_precision`): the
            weights' dtype and NF4's compute dtype. Without CUDA it is fp32, with a one-line
            notice when bf16 or fp16 was asked for.
        dtype: ``float32``/``bfloat16``/``float16``: overrides ``precision`` where given.
    """
    import torch
    from transformers import AutoModelForCausalLM

    p = check_model_dir(path)
    check_remote_code(p, trust_remote_code)
    on_cuda = cuda_available() if device is None else device.startswith("cuda")
    dev = device or ("cuda" if on_cuda else "cpu")
    if dtype is None:
        resolved, note = pick_precision(precision, cuda=on_cuda)
        if note:
            log.warning(note)
        dtype = TORCH_DTYPES[resolved]
    torch_dtype = getattr(torch, dtype)
    kwargs: dict[str, Any] = {
        "local_files_only": True,
        "trust_remote_code": trust_remote_code,
        "dtype": torch_dtype,
    }
    if resolve_quant(quant):
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype,
        )
        kwargs["device_map"] = {"": 0 if dev == "cuda" else dev}
    model: Any = AutoModelForCausalLM.from_pretrained(str(p), **kwargs)
    if "device_map" not in kwargs:
        model.to(dev)
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------
# Tiny models: built offline for tests and the demo.
# ---------------------------------------------------------------------------------------------

TINY_TEACHER: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
}
TINY_STUDENT: dict[str, Any] = {"hidden_size": 96, "intermediate_size": 256, "num_hidden_layers": 2}


# The ChatML format Qwen's chat models use, so the chat path runs on the tiny models too.
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def teacher_training_texts(tok: Any, template: str, question: str, cot: str) -> list[str]:
    """The tiny teacher's two training texts for one solution: the seed's raw prompt continued
    after ``A:`` by a space, and the same prompt as a ChatML user turn answered by the assistant.
    """
    from cot.engines import chat_text
    from cot.prompts import render

    text = render(template, question)
    chat = chat_text(tok, [{"role": "user", "content": text}])
    return [f"{text} {cot}", f"{chat}{cot}<|im_end|>\n"]


def train_tokenizer(texts: list[str], vocab_size: int = 600) -> Any:
    """A byte-level BPE trained with Qwen2's own normalizer and pre-tokenizer.

    transformers 5 rebuilds a ``Qwen2Tokenizer`` from vocab and merges and ignores a saved
    pre-tokenizer, so any other settings would re-encode text differently after a reload.
    """
    from tokenizers import Tokenizer, models, trainers
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    # Borrow the exact normalizer/pre-tokenizer/decoder from a blank Qwen2Tokenizer.
    blank: Any = Qwen2Tokenizer()._tokenizer
    tok = Tokenizer(models.BPE())
    tok.normalizer = blank.normalizer
    tok.pre_tokenizer = blank.pre_tokenizer
    tok.decoder = blank.decoder
    from tokenizers.pre_tokenizers import ByteLevel

    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    merges: Any = [
        tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in data["model"]["merges"]
    ]
    hf = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,  # type: ignore[arg-type]  # byte-level BPE needs no unk token
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    hf.model_max_length = 2048
    hf.chat_template = CHATML_TEMPLATE
    return hf


def _lm_train(
    model: Any, tok: Any, texts: list[str], steps: int, seed: int, lr: float, batch: int = 16
) -> list[float]:
    """Plain causal-LM training on whole texts (each ends with eos); returns the losses."""
    import torch

    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    model.train()
    losses = []
    order = list(range(len(texts)))
    pos = len(order)
    for _ in range(steps):
        if pos + batch > len(order):
            rng.shuffle(order)
            pos = 0
        chunk = [texts[i] + tok.eos_token for i in order[pos : pos + batch]]
        pos += batch
        enc = tok(chunk, return_tensors="pt", padding=True, padding_side="right")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        out = model(**enc, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(out.loss.detach().item())
    model.eval()
    return losses


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def build_tiny_models(
    out_dir: str | Path,
    train_records: list[dict[str, Any]],
    *,
    seed: int = 0,
    teacher_steps: int = 300,
    student_steps: int = 150,
    prompt_template: str,
) -> dict[str, Any]:
    """Build ``teacher/`` and ``student/`` under ``out_dir`` from the training questions.

    The teacher is trained on prompt + reference solution, both as the seed's raw prompt and as
    a ChatML chat turn, so it writes step-by-step text that ends in a ``Final Answer:`` line in
    either format. The student is pre-trained on questions and solution steps
    with the answer line removed: a small "base model" that knows the language of the domain
    but not the solution format (no prompt format, no ``Final Answer:``), which LoRA must teach.
    Each model folder is written to a temp folder and swapped into place, so a crash leaves the
    previous model or the new one, never a half-built one or none.
    """
    import time

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from cot.records import atomic_dir

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from cot.prompts import render

    raw_texts = [
        render(prompt_template, r["question"]) + " " + r["reference_cot"] for r in train_records
    ]
    question_texts = [r["question"] for r in train_records]
    tok = train_tokenizer(raw_texts + question_texts)
    teacher_texts = [
        t
        for r in train_records
        for t in teacher_training_texts(tok, prompt_template, r["question"], r["reference_cot"])
    ]
    # The student's "pre-training" corpus: questions and worked steps, never an answer line or
    # a prompt format, so it knows the language of the domain but not the solution format.
    student_texts = [
        r["question"] + "\n" + "\n".join(r["reference_cot"].splitlines()[:-1])
        for r in train_records
    ]
    stats: dict[str, Any] = {}
    for name, shape, texts, steps, lr in (
        ("teacher", TINY_TEACHER, teacher_texts, teacher_steps, 3e-3),
        ("student", TINY_STUDENT, student_texts, student_steps, 2e-3),
    ):
        t0 = time.time()
        torch.manual_seed(seed)
        config = Qwen2Config(
            vocab_size=len(tok),
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            bos_token_id=None,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **shape,
        )
        model = Qwen2ForCausalLM(config)
        losses = _lm_train(model, tok, texts, steps, seed, lr) if steps else []
        model.generation_config.pad_token_id = tok.pad_token_id
        # A chat turn ends at <|im_end|>, a raw completion at eos: either stops generation.
        model.generation_config.eos_token_id = [
            tok.eos_token_id,
            tok.convert_tokens_to_ids("<|im_end|>"),
        ]
        # The old model stays in place until the new one is whole (see atomic_dir).
        with atomic_dir(out / name) as tmp, _quiet_progress():
            model.save_pretrained(tmp)  # _quiet_progress: a one-shard model needs no bar
            tok.save_pretrained(tmp)
        stats[name] = {
            "params": sum(p.numel() for p in model.parameters()),
            "steps": steps,
            "first_loss": losses[0] if losses else None,
            "last_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
            "seconds": round(time.time() - t0, 1),
        }
    return stats
