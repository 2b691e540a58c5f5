"""Batched generation: left padding, length-grouped batches, stop at the ``Final Answer:`` line.

One call of :func:`generate_batch` turns prompts into completions. Each sequence stops as soon as
its final-answer line is complete (or at EOS), through a stopping criterion that reports per
sequence, so a finished sequence costs no more forward passes than padding.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

# A final-answer line is complete once a newline follows some answer text after the marker.
_FINAL_LINE = re.compile(r"final answer\s*:?\**\s*:?\s*[^\n]*\S[^\n]*\n", re.IGNORECASE)


def cut_after_final_answer(text: str) -> str:
    """Drop anything after the first complete ``Final Answer:`` line (keeps the line itself)."""
    m = _FINAL_LINE.search(text)
    return text[: m.end()].rstrip("\n") if m else text


def length_grouped(
    items: Sequence[Any], key: Callable[[Any], int], batch_size: int
) -> list[list[Any]]:
    """Batches of similar length (longest first), so left padding stays small.

    Sorting is stable, so equal lengths keep input order and the batching is deterministic.
    """
    order = sorted(items, key=lambda it: -key(it))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class FinalAnswerStop:
    """A transformers StoppingCriteria: per sequence, True once its answer line is complete.

    It decodes only the tail of each unfinished sequence (the last ``window`` new tokens), so the
    check costs O(batch) per step, not O(length).
    """

    def __init__(self, tokenizer: Any, prompt_len: int, window: int = 24):
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.window = window
        self.seen_marker: list[bool] | None = None
        self.done: Any = None

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        batch = input_ids.shape[0]
        if self.done is None:
            self.done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
            self.seen_marker = [False] * batch
        assert self.seen_marker is not None
        new = input_ids[:, self.prompt_len :]
        for i in range(batch):
            if self.done[i]:
                continue
            tail_ids = new[i, -self.window :].tolist()
            tail = self.tokenizer.decode(tail_ids, skip_special_tokens=True).lower()
            if not self.seen_marker[i]:
                full = self.tokenizer.decode(new[i].tolist(), skip_special_tokens=True)
                if "final answer" in full.lower():
                    self.seen_marker[i] = True
                    tail = full
                else:
                    continue
            if "\n" in tail:
                full = self.tokenizer.decode(new[i].tolist(), skip_special_tokens=True)
                if _FINAL_LINE.search(full):
                    self.done[i] = True
        return self.done.clone()


def generate_batch(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_at_answer: bool = True,
) -> tuple[list[str], int]:
    """Generate one completion per prompt with left padding.

    Returns:
        (completions, generated token count). Completions are cut after the final-answer line.
    """
    import torch
    from transformers import StoppingCriteriaList

    device = next(model.parameters()).device
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left").to(
        device
    )
    prompt_len = enc["input_ids"].shape[1]
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        if seed is not None:
            torch.manual_seed(seed)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if stop_at_answer:
        kwargs["stopping_criteria"] = StoppingCriteriaList([FinalAnswerStop(tokenizer, prompt_len)])
    with torch.inference_mode():
        out = model.generate(**enc, **kwargs)
    new = out[:, prompt_len:]
    texts = []
    n_tokens = 0
    for row in new:
        ids = row.tolist()
        # Count real tokens: up to and including the first eos/pad after generation started.
        n = len(ids)
        for j, t in enumerate(ids):
            if t in (tokenizer.eos_token_id, tokenizer.pad_token_id):
                n = j
                break
        n_tokens += n
        text = tokenizer.decode(ids[:n], skip_special_tokens=True)
        texts.append(cut_after_final_answer(text) if stop_at_answer else text)
    return texts, n_tokens
