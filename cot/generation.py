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


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """Drop everything from the first stop string on (as an OpenAI-compatible server does)."""
    ends = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return text[: min(ends)] if ends else text


def length_grouped(
    items: Sequence[Any], key: Callable[[Any], int], batch_size: int
) -> list[list[Any]]:
    """Batches of similar length (longest first), so left padding stays small.

    Sorting is stable, so equal lengths keep input order and the batching is deterministic.
    """
    order = sorted(items, key=lambda it: -key(it))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


_MASK32 = 0xFFFFFFFF


def _mul32(x: Any, c: int) -> Any:
    """``x * c mod 2**32`` for int64 tensors holding 32-bit values, without int64 overflow."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def _hash32(x: Any) -> Any:
    """A 32-bit integer hash (xorshift-multiply), elementwise, on int64 tensors."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


class KeyedSampler:
    """A transformers logits processor that samples every row from its own seed.

    Each row draws from ``softmax(logits / temperature)`` restricted to its top-p nucleus, by the
    Gumbel-max trick: it adds Gumbel noise and lets greedy decoding take the argmax. The noise
    depends only on (the row's seed, the number of tokens generated so far, the token id), never
    on the batch, so a record samples the same tokens whatever it is batched with, and a shard
    resumed after a preemption (other batches) writes what an uninterrupted one does.

    Args:
        seeds: one 32-bit seed per row (the request seed of its record key).
        prompt_len: the padded prompt length of the batch (step 0 is the first new token).
    """

    def __init__(self, seeds: Sequence[int], prompt_len: int, temperature: float, top_p: float):
        if temperature <= 0:
            raise ValueError("KeyedSampler needs temperature > 0 (greedy needs no sampler)")
        self.seeds = [int(s) & _MASK32 for s in seeds]
        self.prompt_len, self.temperature, self.top_p = prompt_len, temperature, top_p
        self._tokens: Any = None

    def noise(self, step: int, vocab: int, device: Any) -> Any:
        """Gumbel noise of shape (rows, vocab) for generation step ``step``."""
        import torch

        if self._tokens is None or self._tokens.shape[0] != vocab:
            self._tokens = _hash32(torch.arange(vocab, dtype=torch.int64, device=device))
        seeds = torch.tensor(self.seeds, dtype=torch.int64, device=device)
        row = _hash32(seeds ^ _hash32(torch.full_like(seeds, step) + 0x9E3779B9))
        bits = _hash32(self._tokens[None, :] ^ row[:, None])
        u = (bits.to(torch.float64) + 0.5) / float(1 << 32)  # in (0, 1), never 0 or 1
        return -torch.log(-torch.log(u))

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        logits = scores.to(torch.float64) / self.temperature
        if self.top_p < 1.0:
            ordered, order = torch.sort(logits, dim=-1, descending=True)
            probs = torch.softmax(ordered, dim=-1)
            # Drop a token once the ones ranked above it already hold top_p; the first stays.
            drop = (torch.cumsum(probs, dim=-1) - probs) >= self.top_p
            drop[:, 0] = False
            logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
        step = input_ids.shape[1] - self.prompt_len
        out = logits + self.noise(step, logits.shape[-1], logits.device)
        return out.to(scores.dtype) if scores.dtype == torch.float64 else out.float()


class FinalAnswerStop:
    """A transformers StoppingCriteria: per sequence, True once its answer line is complete.

    Each step costs O(batch), not O(length): it decodes only the last ``window`` new tokens of a
    sequence to look for the marker, and once the marker is seen, it decodes from the marker on,
    only at steps whose last token holds a newline (the one moment a line can complete).
    ``window`` must cover the marker's tokens; 24 does for any byte-level tokenizer, since
    ``final answer`` is 12 ASCII bytes.
    """

    def __init__(self, tokenizer: Any, prompt_len: int, window: int = 24):
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.window = window
        # Per sequence: the new-token index the marker's window began at, once seen.
        self.marker_at: list[int | None] = []
        self.done: Any = None

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        batch = input_ids.shape[0]
        if self.done is None:
            self.done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
            self.marker_at = [None] * batch
        new = input_ids[:, self.prompt_len :]
        n = new.shape[1]
        decode = self.tokenizer.decode
        for i in range(batch):
            if self.done[i]:
                continue
            at = self.marker_at[i]
            if at is None:
                lo = max(0, n - self.window)
                if (
                    "final answer"
                    not in decode(new[i, lo:].tolist(), skip_special_tokens=True).lower()
                ):
                    continue
                at = self.marker_at[i] = lo
            elif "\n" not in decode(new[i, -1:].tolist(), skip_special_tokens=True):
                continue
            if _FINAL_LINE.search(decode(new[i, at:].tolist(), skip_special_tokens=True)):
                self.done[i] = True
        return self.done.clone()


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token that ends a completion: the tokenizer's eos and the generation config's.

    Chat models end a turn with their own token (``<|im_end|>`` for Qwen) that the generation
    config lists next to eos; passing the tokenizer's eos alone would write past it.
    """
    ids: list[int] = []
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for t in (tokenizer.eos_token_id, config_eos):
        for i in t if isinstance(t, (list, tuple)) else [t]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return ids


def generate_batch(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seeds: Sequence[int] | None = None,
    stop_at_answer: bool = True,
    add_special_tokens: bool = True,
) -> tuple[list[str], list[int]]:
    """Generate one completion per prompt with left padding.

    ``add_special_tokens=False`` for prompts that already carry their special tokens (a chat
    template's output); raw prompts get the tokenizer's (a BOS where the model has one).
    With ``temperature > 0`` each prompt samples from its own seed in ``seeds`` (default: 0 for
    every row), through :class:`KeyedSampler`: what a prompt gets does not depend on its batch.

    Returns:
        (completions, generated tokens per completion). Completions are cut after the
        final-answer line.
    """
    import torch
    from transformers import LogitsProcessorList, StoppingCriteriaList

    device = next(model.parameters()).device
    enc = tokenizer(
        list(prompts),
        return_tensors="pt",
        padding=True,
        padding_side="left",
        add_special_tokens=add_special_tokens,
    ).to(device)
    prompt_len = enc["input_ids"].shape[1]
    stops = stop_token_ids(model, tokenizer)
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": stops,
    }
    # Sampling is greedy decoding over Gumbel-perturbed scores (KeyedSampler), so generate()
    # itself never draws from a global RNG.
    kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if temperature > 0:
        rows = list(seeds) if seeds is not None else [0] * len(prompts)
        if len(rows) != len(prompts):
            raise ValueError(f"{len(rows)} seeds for {len(prompts)} prompts")
        kwargs["logits_processor"] = LogitsProcessorList(
            [KeyedSampler(rows, prompt_len, temperature, top_p)]
        )
    if stop_at_answer:
        kwargs["stopping_criteria"] = StoppingCriteriaList([FinalAnswerStop(tokenizer, prompt_len)])
    with torch.inference_mode():
        out = model.generate(**enc, **kwargs)
    new = out[:, prompt_len:]
    ends = {*stops, tokenizer.pad_token_id}
    texts, counts = [], []
    for row in new:
        ids = row.tolist()
        # Real tokens: up to the first stop or pad token after generation started.
        n = next((j for j, t in enumerate(ids) if t in ends), len(ids))
        counts.append(n)
        text = tokenizer.decode(ids[:n], skip_special_tokens=True)
        texts.append(cut_after_final_answer(text) if stop_at_answer else text)
    return texts, counts
