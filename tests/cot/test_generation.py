"""Batched generation with left padding equals one-at-a-time, and stops after the answer."""

from __future__ import annotations

from pathlib import Path

import pytest

from cot.generation import cut_after_final_answer, generate_batch, length_grouped


def test_cut_after_final_answer() -> None:
    assert cut_after_final_answer("a\nFinal Answer: 3\nmore junk") == "a\nFinal Answer: 3"
    assert cut_after_final_answer("no answer yet") == "no answer yet"
    assert cut_after_final_answer("**Final Answer:** 7\nx") == "**Final Answer:** 7"


def test_length_grouped_is_deterministic_and_tight() -> None:
    items = list(range(10))
    batches = length_grouped(items, key=lambda i: [5, 1, 9, 3, 7, 2, 8, 4, 6, 0][i], batch_size=3)
    assert [len(b) for b in batches] == [3, 3, 3, 1]
    assert batches == length_grouped(
        items, key=lambda i: [5, 1, 9, 3, 7, 2, 8, 4, 6, 0][i], batch_size=3
    )
    assert sorted(x for b in batches for x in b) == items


@pytest.fixture(scope="module")
def teacher(tiny_models: Path):  # type: ignore[no-untyped-def]
    import torch

    from cot.models import load_model, load_tokenizer

    torch.set_num_threads(2)
    return load_model(tiny_models / "teacher", quant="none"), load_tokenizer(
        tiny_models / "teacher"
    )


def prompts(dataset_dir: Path, n: int) -> list[str]:
    from cot.prompts import TEACHER_TEMPLATE, load_template, render
    from cot.records import read_questions

    t = load_template(TEACHER_TEMPLATE)
    return [
        render(t, q["question"]) for q in read_questions(dataset_dir / "test_questions.jsonl")[:n]
    ]


def test_batched_left_padding_equals_sequential(teacher, dataset_dir: Path) -> None:  # type: ignore[no-untyped-def]
    model, tok = teacher
    ps = prompts(dataset_dir, 12)
    batched, _ = generate_batch(model, tok, ps, max_new_tokens=96)
    single = [generate_batch(model, tok, [p], max_new_tokens=96)[0][0] for p in ps]
    assert batched == single


def test_stops_at_final_answer_line(teacher, dataset_dir: Path) -> None:  # type: ignore[no-untyped-def]
    model, tok = teacher
    ps = prompts(dataset_dir, 8)
    stopped, n_stop = generate_batch(model, tok, ps, max_new_tokens=160)
    free, n_free = generate_batch(model, tok, ps, max_new_tokens=160, stop_at_answer=False)
    answered = [s for s in stopped if "Final Answer:" in s]
    assert len(answered) >= 6
    for s, f in zip(stopped, free, strict=True):
        assert f.startswith(s)  # same text up to the cut
    for s in answered:
        assert "\n" not in s.split("Final Answer:")[-1]  # nothing after the answer line
    assert sum(n_stop) <= sum(n_free)


def test_right_padding_would_differ(teacher, dataset_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """Guards the test above: with right padding the batched output changes."""
    model, tok = teacher
    ps = prompts(dataset_dir, 12)
    left, _ = generate_batch(model, tok, ps, max_new_tokens=48, stop_at_answer=False)
    enc = tok(ps, return_tensors="pt", padding=True, padding_side="right")
    out = model.generate(**enc, max_new_tokens=48, do_sample=False, pad_token_id=tok.pad_token_id)
    right = [tok.decode(r[enc["input_ids"].shape[1] :], skip_special_tokens=True) for r in out]
    assert sum(a != b for a, b in zip(left, right, strict=True)) > 0


class _CharTokenizer:
    """One token per character: ids are code points (enough to drive the stopper)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


def test_final_answer_stop_stops_a_model_that_keeps_writing() -> None:
    """Token ids that go on past the answer line: the stopper must say stop right at its end,
    for that row only, and never before the line is complete."""
    import torch

    from cot.generation import FinalAnswerStop

    prompt = "Q: 2+2?\nA:"
    rows = [
        " two plus two\nFinal Answer: 4\nand then it rambles on and on",
        " still thinking about it, no marker yet at all......................",
    ]
    rows[1] = rows[1][: len(rows[0])].ljust(len(rows[0]), ".")
    stop = FinalAnswerStop(_CharTokenizer(), prompt_len=len(prompt))
    end_of_line = rows[0].index("4\n") + 2  # the first step at which the line is complete
    flags = []
    for step in range(1, len(rows[0]) + 1):
        ids = torch.tensor([[ord(c) for c in prompt + r[:step]] for r in rows])
        flags.append(stop(ids, None).tolist())
    first_stop = next(i for i, (a, _) in enumerate(flags, 1) if a)
    assert first_stop == end_of_line
    assert all(not b for _, b in flags)  # the row without a marker never stops
    assert all(a for a, _ in flags[first_stop - 1 :])  # once stopped, it stays stopped


class _CountingTokenizer(_CharTokenizer):
    def __init__(self) -> None:
        self.decoded = 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.decoded += len(ids)
        return super().decode(ids)


def test_final_answer_stop_costs_o_new_tokens_per_step() -> None:
    """Over a long completion, the stopper decodes a bounded number of tokens per step (it
    must not re-decode the whole sequence each step, before or after the marker)."""
    import torch

    from cot.generation import FinalAnswerStop

    steps = 600
    text = ("step by step, " * 60)[: steps - 40] + "\nFinal Answer: " + "x" * 200
    text = text[:steps]
    tok = _CountingTokenizer()
    stop = FinalAnswerStop(tok, prompt_len=0)
    for step in range(1, steps + 1):
        assert not stop(torch.tensor([[ord(c) for c in text[:step]]]), None)[0]
    # O(new tokens): about ``window`` tokens per step; decoding the whole sequence would cost
    # steps**2 / 2 = 180,000.
    assert tok.decoded <= steps * (stop.window + 1)


def test_next_turn_stop_of_the_seed_templates_and_the_cut() -> None:
    from cot.generation import cut_at_stop
    from cot.prompts import STUDENT_TEMPLATE, TEACHER_TEMPLATE, load_template, next_turn_stop

    assert next_turn_stop(load_template(TEACHER_TEMPLATE)) == "\nQ:"
    assert next_turn_stop(load_template(STUDENT_TEMPLATE)) == "\n### Question:"
    assert next_turn_stop("{question}") is None
    text = "2+2=4\nFinal Answer: 4\n\nQ: what is 3+3?\nA: 6"
    assert cut_at_stop(text, ["\nQ:"]) == "2+2=4\nFinal Answer: 4\n"
    assert cut_at_stop(text, ["\nA:", "\nQ:"]) == "2+2=4\nFinal Answer: 4\n"  # the first one
    assert cut_at_stop(text, []) == text and cut_at_stop(text, ["zzz"]) == text


def test_keyed_sampler_draws_from_the_softmax_and_its_nucleus() -> None:
    import collections

    import torch

    from cot.generation import KeyedSampler

    logits = torch.tensor([[2.0, 1.0, 0.0]])
    none = torch.zeros((1, 0), dtype=torch.long)
    for top_p, want in ((1.0, torch.softmax(logits, -1)[0]), (0.8, None)):
        counts: collections.Counter[int] = collections.Counter()
        for seed in range(4000):
            counts[int(KeyedSampler([seed], 0, 1.0, top_p)(none, logits).argmax())] += 1
        if want is None:  # top_p 0.8 keeps tokens 0 and 1 (0.665 + 0.245 >= 0.8)
            p = torch.softmax(logits[0, :2], -1)
            want = torch.tensor([p[0], p[1], 0.0])
        for tok in range(3):
            assert abs(counts[tok] / 4000 - float(want[tok])) < 0.025, (top_p, counts)


def test_a_sampled_record_is_the_same_in_any_batch(teacher, dataset_dir: Path) -> None:  # type: ignore[no-untyped-def]
    # A resumed shard batches its remaining records differently: what a record samples must
    # depend only on its own seed, never on what it is batched with.
    model, tok = teacher
    ps = prompts(dataset_dir, 6)
    kw = {"max_new_tokens": 48, "temperature": 1.0, "top_p": 0.95}
    together, _ = generate_batch(model, tok, ps, seeds=[11, 12, 13, 14, 15, 16], **kw)
    alone = [generate_batch(model, tok, [ps[i]], seeds=[11 + i], **kw)[0][0] for i in (5, 2, 0)]
    assert alone == [together[5], together[2], together[0]]
    # Different seeds for one prompt give different samples (several samples per question).
    draws = {generate_batch(model, tok, [ps[0]], seeds=[s], **kw)[0][0] for s in range(6)}
    assert len(draws) > 1
