"""Teacher generation throughput: the seed's loop against ours, in one process, same model.

    .venv/bin/python benchmarks/generation.py [--num 64] [--batch-size 32] [--max-new-tokens 256]

* The seed's loop: one question at a time, plain ``model.generate`` with a fixed
  ``max_new_tokens`` and no stopping criterion (greedy).
* Ours: :func:`cot.generation.generate_batch` over length-grouped batches
  (:func:`cot.generation.length_grouped`), left padding, stopping each sequence at its
  ``Final Answer:`` line (``FinalAnswerStop``), greedy.

Both run on the same tokenizer, model object, prompts and thread count. The script prints
questions/s for both, the ratio, and whether the greedy extracted answers are identical
(``extract_final_answer`` of both outputs, per question). Goal: >= 10x with identical answers.
Exits 1 when the answers differ.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cot.answers import extract_final_answer  # noqa: E402
from cot.generation import cut_after_final_answer, generate_batch, length_grouped  # noqa: E402
from cot.models import load_model, load_tokenizer  # noqa: E402
from cot.prompts import TEACHER_TEMPLATE, load_template, prompt  # noqa: E402
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


def ours(
    model: Any, tok: Any, prompts: list[str], max_new_tokens: int, batch_size: int
) -> list[str]:
    """Length-grouped batches through ``generate_batch`` (stops at the final-answer line)."""
    lengths = {i: len(tok(p)["input_ids"]) for i, p in enumerate(prompts)}
    texts: dict[int, str] = {}
    for batch in length_grouped(list(range(len(prompts))), lambda i: lengths[i], batch_size):
        got, _ = generate_batch(
            model, tok, [prompts[i] for i in batch], max_new_tokens=max_new_tokens, temperature=0
        )
        texts.update(zip(batch, got, strict=True))
    return [texts[i] for i in range(len(prompts))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default=str(REPO / "models" / "tiny" / "teacher"))
    ap.add_argument("--input", default=str(REPO / "data" / "test_questions.jsonl"))
    ap.add_argument("--num", type=int, default=64, help="questions (>= 64 for the goal)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the box's cores)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.teacher)
    model = load_model(args.teacher, quant="none")
    template = load_template(TEACHER_TEMPLATE)
    questions = read_questions(args.input)[: args.num]
    prompts = [prompt(template, q["question"]) for q in questions]
    n = len(prompts)
    print(
        f"{n} questions from {args.input}, teacher {args.teacher}, "
        f"{torch.get_num_threads()} threads, max_new_tokens {args.max_new_tokens}"
    )

    # Warm both paths up once (first-call allocations), outside the timings.
    seed_loop(model, tok, prompts[:1], 8)
    ours(model, tok, prompts[:2], 8, 2)

    t = time.perf_counter()
    seed_texts = seed_loop(model, tok, prompts, args.max_new_tokens)
    seed_s = time.perf_counter() - t
    t = time.perf_counter()
    our_texts = ours(model, tok, prompts, args.max_new_tokens, args.batch_size)
    our_s = time.perf_counter() - t

    seed_answers = [extract_final_answer(x) for x in seed_texts]
    our_answers = [extract_final_answer(x) for x in our_texts]
    differ = [i for i in range(n) if seed_answers[i] != our_answers[i]]
    pairs = zip(seed_texts, our_texts, strict=True)
    same_text = sum(cut_after_final_answer(s) == o for s, o in pairs)
    with_answer = sum(a is not None for a in our_answers)
    seed_qps, our_qps = n / seed_s, n / our_s
    ratio = our_qps / seed_qps
    print(f"seed loop (1 at a time, fixed {args.max_new_tokens} tokens): ", end="")
    print(f"{seed_s:7.2f} s  {seed_qps:7.2f} questions/s")
    print(f"ours (length-grouped batch {args.batch_size}, FinalAnswerStop):  ", end="")
    print(f"{our_s:7.2f} s  {our_qps:7.2f} questions/s")
    print(f"speed-up: {ratio:.1f}x")
    print(
        f"greedy extracted answers identical: {'yes' if not differ else 'NO'} "
        f"({n - len(differ)}/{n}; {with_answer} with an answer; "
        f"{same_text}/{n} texts identical up to the final-answer line)"
    )
    for i in differ[:5]:
        print(f"  differs #{i}: seed {seed_answers[i]!r} ours {our_answers[i]!r}")
    met = ratio >= 10 and not differ
    print(f"goal: >= 10x with identical answers -> {'met' if met else 'MISSED'}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
