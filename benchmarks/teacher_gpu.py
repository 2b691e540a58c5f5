"""Teacher throughput on a GPU: the ``server`` engine (vLLM) against the ``hf`` engine, tokens/s.

    .venv/bin/python benchmarks/teacher_gpu.py [--out DIR] [--num 256] [--max-new-tokens 256]
        [--batch-size 64] [--concurrency 256] [--server vllm|sglang|transformers]
        [--shape qwen2.5-0.5b|tiny]

The model is a randomly initialised Qwen2 of Qwen2.5-0.5B's shape (24 layers, hidden 896, 14
heads, 2 KV heads, vocab 151,936), built offline into ``DIR/model`` with the tiny tokenizer
grown to the full vocabulary, so nothing is downloaded. A random model never writes a
``Final Answer:`` line and almost never its EOS, so both engines generate about
``--max-new-tokens`` per prompt; the figures are output tokens/s from each engine's own counts.

Where the server's package is not installed, it measures the ``hf`` engine alone and says so.
Goal: server >= 5x hf. ``--shape tiny`` runs the same path in seconds (a CPU smoke check).
Exit codes: 0 measured, 1 an engine failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.generation import timed  # noqa: E402
from cot.engines import Decoding, HFEngine, Request, ServerEngine, gather  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    ),
}
PACKAGES = {"vllm": "vllm", "sglang": "sglang", "transformers": "fastapi"}


def build(out: Path, shape: str, tokenizer_dir: Path) -> Path:
    """A random Qwen2 of ``shape`` with the tiny tokenizer grown to its vocabulary (bf16)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from cot.models import load_tokenizer

    dest = out / f"model-{shape}"
    if (dest / "config.json").exists():
        return dest
    tok = load_tokenizer(tokenizer_dir)
    spec = SHAPES[shape]
    tok.add_tokens([f"<r{i}>" for i in range(spec["vocab_size"] - len(tok))])
    torch.manual_seed(0)
    cfg = Qwen2Config(
        **spec,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        torch_dtype="bfloat16",
    )
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    tmp = out / f".model-{shape}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/cothpc-teacher-gpu")
    ap.add_argument("--tokenizer", default=str(REPO / "models" / "tiny" / "teacher"))
    ap.add_argument("--input", default=str(REPO / "data" / "raw_questions.jsonl"))
    ap.add_argument("--num", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64, help="the hf engine's batch size")
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--server", default="vllm", choices=sorted(PACKAGES))
    ap.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    args = ap.parse_args(argv)

    import torch

    from cot import serving
    from cot.models import load_model, load_tokenizer
    from cot.prompts import TEACHER_TEMPLATE, load_template, render
    from cot.records import read_questions

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = build(out, args.shape, Path(args.tokenizer))
    template = load_template(TEACHER_TEMPLATE)
    questions = read_questions(args.input)[: args.num]
    requests = [Request((q["id"], 0), render(template, q["question"]), 0) for q in questions]
    decoding = Decoding(max_new_tokens=args.max_new_tokens)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(
        f"teacher_gpu: random Qwen2 of shape {args.shape} on {device}, {len(requests)} prompts, "
        f"greedy, max_new_tokens {args.max_new_tokens}"
    )

    def measure(engine: Any) -> tuple[float, int]:
        gather(engine, requests[: min(8, len(requests))])  # warm-up
        s, _, tokens = timed(engine, requests)
        return s, tokens

    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, quant="none")
    hf_s, hf_tokens = measure(HFEngine(model, tok, decoding, batch_size=args.batch_size))
    hf_tps = hf_tokens / hf_s
    print(f"teacher_gpu: hf engine (batch {args.batch_size}): {hf_tokens} tokens in {hf_s:.1f}s")
    print(f"teacher_gpu: hf engine: {hf_tps:.0f} output tokens/s")
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    if importlib.util.find_spec(PACKAGES[args.server]) is None:
        print(
            f"teacher_gpu: {args.server} is not installed here: measured the hf engine alone "
            "(goal server >= 5x hf: not measured)"
        )
        return 0
    port = serving.free_port()
    cmd = serving.server_argv(
        args.server,
        model=str(model_dir),
        port=port,
        gpus=1,
        kv_fraction=serving.kv_fraction(1 if torch.cuda.is_available() else 0, None, 1),
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with serving.Server(cmd, port=port, log_path=out / "server.log", env=env, timeout_s=900) as srv:
        name = serving.served_models(srv.url)[0]
        engine = ServerEngine(srv.url, name, decoding, concurrency=args.concurrency)
        sv_s, sv_tokens = measure(engine)
    sv_tps = sv_tokens / sv_s
    print(f"teacher_gpu: server engine ({args.server}, concurrency {args.concurrency}): ", end="")
    print(f"{sv_tokens} tokens in {sv_s:.1f}s")
    print(f"teacher_gpu: server engine: {sv_tps:.0f} output tokens/s")
    ratio = sv_tps / hf_tps
    print(
        f"teacher_gpu: server / hf = {ratio:.1f}x (goal >= 5x: {'met' if ratio >= 5 else 'MISSED'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
