"""Teacher generation throughput: the seed's loop, the ``hf`` engine and the ``server`` engine.

    .venv/bin/python benchmarks/generation.py [--num 95] [--batch-size 32] [--max-new-tokens 256]
        [--concurrency 32 128] [--prompt-format raw|chat]

All on the same teacher (``models/tiny/teacher`` by default), the same questions, the seed's
prompt, greedy, in one run:

* **seed loop**: one question at a time, plain ``model.generate`` with a fixed
  ``max_new_tokens`` and no stopping criterion.
* **hf**: :class:`cot.engines.HFEngine`, length-grouped batches with left padding, each sequence
  stopped at its ``Final Answer:`` line.
* **server**: :class:`cot.engines.ServerEngine` against ``transformers serve
  --continuous-batching`` started by :class:`cot.serving.Server` (the ``transformers`` preset),
  at each ``--concurrency``. The server runs in its own process on the same cores.

It prints questions/s and output tokens/s per engine, each engine's ratio to the seed loop, and
how many extracted answers equal the seed loop's. Goal on CPU: the best engine at >= 10x the
seed loop with identical answers. Exits 1 when the hf engine's answers differ from the seed's
(the hf engine is exact by construction; the server may differ in the last float bits).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cot.answers import extract_final_answer  # noqa: E402
from cot.engines import Decoding, HFEngine, Request, ServerEngine, gather, prompt_text  # noqa: E402
from cot.models import load_model, load_tokenizer  # noqa: E402
from cot.prompts import TEACHER_TEMPLATE, load_template, teacher_prompt  # noqa: E402
from cot.records import read_questions  # noqa: E402


def seed_loop(model: Any, tok: Any, prompts: list[str], max_new_tokens: int) -> list[str]:
    """The seed's generation: one prompt per ``generate`` call, fixed length, greedy."""
    import torch

    out = []
    for p in prompts:
        enc = tok(p, return_tensors="pt")
        with torch.inference_mode():
            ids = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=tok.pad_token_id,
            )
        out.append(tok.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    return out


def timed(engine: Any, requests: list[Request]) -> tuple[float, list[str], int]:
    """(seconds, texts in request order, output tokens) of one engine over all requests."""
    t = time.perf_counter()
    got = gather(engine, requests)
    s = time.perf_counter() - t
    errors = [c.error for c in got.values() if c.error]
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, first: {errors[0]}")
    return s, [got[r.key].text for r in requests], sum(c.tokens for c in got.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default=str(REPO / "models" / "tiny" / "teacher"))
    ap.add_argument("--input", default=str(REPO / "data" / "test_questions.jsonl"))
    ap.add_argument("--num", type=int, default=95, help="questions (>= 95 for the goal)")
    ap.add_argument("--batch-size", type=int, default=32, help="the hf engine's batch size")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--concurrency", type=int, nargs="*", default=[32, 128])
    ap.add_argument("--prompt-format", choices=("raw", "chat"), default="raw")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the box's cores)")
    args = ap.parse_args(argv)

    import torch

    from cot import serving

    torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.teacher)
    model = load_model(args.teacher, quant="none")
    template = load_template(TEACHER_TEMPLATE)
    questions = read_questions(args.input)[: args.num]
    prompts = [teacher_prompt(template, q["question"], args.prompt_format) for q in questions]
    requests = [Request((q["id"], 0), p, 0) for q, p in zip(questions, prompts, strict=True)]
    n = len(requests)
    decoding = Decoding(max_new_tokens=args.max_new_tokens)
    print(
        f"{n} questions from {args.input}, teacher {args.teacher}, {args.prompt_format} prompts, "
        f"{torch.get_num_threads()} threads, greedy, max_new_tokens {args.max_new_tokens}"
    )

    hf = HFEngine(model, tok, decoding, batch_size=args.batch_size)
    # Warm both in-process paths up once (first-call allocations), outside the timings.
    texts = [prompt_text(tok, p) for p in prompts]
    seed_loop(model, tok, texts[:1], 8)
    gather(hf, requests[:2])

    rows: list[tuple[str, float, list[str], int]] = []
    t = time.perf_counter()
    seed_texts = seed_loop(model, tok, texts, args.max_new_tokens)
    seed_s = time.perf_counter() - t
    seed_tokens = sum(len(tok(x, add_special_tokens=False)["input_ids"]) for x in seed_texts)
    rows.append(("seed loop (1 at a time, fixed length)", seed_s, seed_texts, seed_tokens))
    rows.append((f"hf engine (batch {args.batch_size}, stop at answer)", *timed(hf, requests)))

    if args.concurrency:
        port = serving.free_port()
        argv_ = serving.server_argv("transformers", model=args.teacher, port=port)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
        with tempfile.TemporaryDirectory() as tmp:
            log = Path(tmp) / "server.log"
            with serving.Server(argv_, port=port, log_path=log, env=env, tail=False) as srv:
                for c in args.concurrency:
                    eng = ServerEngine(srv.url, args.teacher, decoding, concurrency=c)
                    gather(eng, requests[: min(n, c)])  # warm-up at this concurrency
                    label = f"server engine (transformers serve CB, concurrency {c})"
                    rows.append((label, *timed(eng, requests)))

    seed_answers = [extract_final_answer(x) for x in seed_texts]
    seed_qps = n / seed_s
    width = max(len(r[0]) for r in rows)
    print(f"{'engine':{width}}  {'s':>7}  {'q/s':>7}  {'tok/s':>7}  {'x seed':>6}  same answers")
    best = 0.0
    hf_same = 0
    for label, s, out, tokens in rows:
        answers = [extract_final_answer(x) for x in out]
        same = sum(a == b for a, b in zip(answers, seed_answers, strict=True))
        ratio = (n / s) / seed_qps
        if label.startswith("hf"):
            hf_same = same
        if same == n and not label.startswith("seed"):
            best = max(best, ratio)
        print(
            f"{label:{width}}  {s:7.2f}  {n / s:7.2f}  {tokens / s:7.1f}  {ratio:5.1f}x  {same}/{n}"
        )
    with_answer = sum(a is not None for a in seed_answers)
    print(f"{with_answer}/{n} seed-loop outputs have a final answer")
    met = best >= 10
    print(
        f"goal: best engine >= 10x the seed loop with identical answers -> "
        f"{'met' if met else 'MISSED'} (best with identical answers: {best:.1f}x)"
    )
    return 0 if hf_same == n else 1


if __name__ == "__main__":
    sys.exit(main())
