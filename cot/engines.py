"""Generation engines: prompts in, completions and token counts out.

Two engines share one contract, so the shard loop, the record format and the stop-at-answer cut
are the same whichever runs:

* :class:`HFEngine`: in-process batched ``generate`` (length-grouped batches, left padding,
  per-sequence stop at the ``Final Answer:`` line).
* :class:`ServerEngine`: an OpenAI-compatible HTTP client (vLLM, SGLang, ``transformers serve``)
  with a bounded number of requests in flight. Completions come back as they finish, so each
  can be written to disk at once.

:meth:`Engine.run` yields ``(request, completion)`` pairs as they finish and checks
``should_stop`` before it starts new work; a stop or an exception abandons only what is in
flight. A request the server refuses (HTTP 4xx, an overlong prompt) comes back as a
:class:`Completion` with ``error`` set, never as a silent drop.

Pure and cluster-free: no SLURM, no run folders. The HTTP client is the standard library's.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from cot.errors import CotError

log = logging.getLogger(__name__)

# A prompt is raw text (sent as is) or chat messages (the model's chat template applies).
Messages = list[dict[str, str]]
Prompt = str | Messages
Key = tuple[str, int]


class EngineError(CotError):
    """Generation failed for good (a server that died or kept failing); the shard stays open."""

    exit_code = 1


@dataclass(frozen=True)
class Request:
    """One completion to produce: its record key, its prompt and its sampling seed."""

    key: Key
    prompt: Prompt
    seed: int


@dataclass(frozen=True)
class Completion:
    """What an engine returns for one request. ``error`` set means no text was produced."""

    text: str
    tokens: int
    error: str | None = None


@dataclass(frozen=True)
class Decoding:
    """The settings that decide a completion, shared by every engine."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop_at_answer: bool = True
    # Stop strings (raw prompts: where the next question would start). The server stops there
    # itself; both engines also cut the text there, so their outputs agree.
    stop: tuple[str, ...] = ()


StopCheck = Callable[[], bool]


def never() -> bool:
    """A ``should_stop`` that never asks to stop."""
    return False


class Engine:
    """Turns requests into completions; subclasses implement :meth:`run`."""

    def run(
        self, requests: Sequence[Request], should_stop: StopCheck = never
    ) -> Iterator[tuple[Request, Completion]]:
        """Yield each request with its completion as it finishes (in any order)."""
        raise NotImplementedError

    def close(self) -> None:
        """Free what the engine holds (threads, connections)."""


def chat_text(tokenizer: Any, messages: Messages) -> str:
    """The model's own chat template applied to ``messages``, ending where the assistant writes."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return str(text)


def prompt_text(tokenizer: Any, prompt: Prompt) -> str:
    """The exact text the model continues: raw prompts as is, chat through its template."""
    return prompt if isinstance(prompt, str) else chat_text(tokenizer, prompt)


def token_count(tokenizer: Any, prompt: Prompt, text: str | None = None) -> int:
    """Prompt tokens as the model sees them: a chat template's text carries its own specials.
    ``text`` is ``prompt_text(tokenizer, prompt)`` where the caller has it already."""
    if text is None:
        text = prompt_text(tokenizer, prompt)
    return len(tokenizer(text, add_special_tokens=isinstance(prompt, str))["input_ids"])


def has_chat_template(tokenizer: Any) -> bool:
    """True when the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


class PromptLimit:
    """Refuses prompts that leave no room for ``max_new_tokens`` within the model's context.

    vLLM and SGLang answer such a request with HTTP 400; ``generate`` would run past the
    positions the model was trained on. Both engines turn it into an error record instead.
    """

    def __init__(self, tokenizer: Any, max_positions: int | None, max_new_tokens: int):
        self.tokenizer = tokenizer
        self.max_positions = max_positions
        self.max_new_tokens = max_new_tokens

    def length(self, prompt: Prompt) -> int:
        """Prompt tokens, as the model sees them (chat template applied)."""
        return token_count(self.tokenizer, prompt)

    def error(self, n_prompt: int) -> str | None:
        """The reason a prompt of ``n_prompt`` tokens is refused, or None."""
        if self.max_positions is None or n_prompt + self.max_new_tokens <= self.max_positions:
            return None
        return (
            f"prompt too long: {n_prompt} prompt tokens + max_new_tokens {self.max_new_tokens} "
            f"exceed the model's {self.max_positions} positions"
        )


# --------------------------------------------------------------------------- in-process


class HFEngine(Engine):
    """In-process batched ``generate``: length-grouped batches, left padding, stop at the answer.

    Sampling seeds are per request (from its record key): a record samples the same tokens in
    any batch, so a resumed shard writes what an uninterrupted one does. Greedy output equals
    one-at-a-time generation token for token.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        decoding: Decoding,
        *,
        batch_size: int,
        max_positions: int | None = None,
    ):
        self.model, self.tokenizer, self.decoding = model, tokenizer, decoding
        self.batch_size = batch_size
        self.limit = PromptLimit(tokenizer, max_positions, decoding.max_new_tokens)

    def run(
        self, requests: Sequence[Request], should_stop: StopCheck = never
    ) -> Iterator[tuple[Request, Completion]]:
        from cot.generation import cut_at_stop, generate_batch, length_grouped

        texts = {r.key: prompt_text(self.tokenizer, r.prompt) for r in requests}
        lengths = {r.key: token_count(self.tokenizer, r.prompt, texts[r.key]) for r in requests}
        ok: list[Request] = []
        for r in requests:
            reason = self.limit.error(lengths[r.key])
            if reason:
                yield r, Completion("", 0, error=reason)
            else:
                ok.append(r)
        for batch in length_grouped(ok, lambda r: lengths[r.key], self.batch_size):
            if should_stop():
                return
            out, counts = generate_batch(
                self.model,
                self.tokenizer,
                [texts[r.key] for r in batch],
                max_new_tokens=self.decoding.max_new_tokens,
                temperature=self.decoding.temperature,
                top_p=self.decoding.top_p,
                seeds=[r.seed for r in batch],
                stop_at_answer=self.decoding.stop_at_answer,
                add_special_tokens=isinstance(batch[0].prompt, str),
            )
            for r, text, n in zip(batch, out, counts, strict=True):
                # Already cut after the answer line; a stop string can only cut it shorter.
                yield r, Completion(cut_at_stop(text, self.decoding.stop), n)


# --------------------------------------------------------------------------- HTTP client


class _Refused(Exception):
    """The server answered 4xx: this request will never succeed as sent."""


class _Transient(Exception):
    """A connection error, a timeout or a 5xx: worth another try."""


def post_json(url: str, payload: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """POST ``payload`` as JSON; raise _Refused on 4xx and _Transient on 5xx or no connection."""
    data = json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            body: dict[str, Any] = json.loads(resp.read())
            return body
    except urllib.error.HTTPError as e:
        detail = e.read().decode("utf-8", "replace")[:500].strip()
        if 400 <= e.code < 500:
            raise _Refused(f"HTTP {e.code}: {detail or e.reason}") from None
        raise _Transient(f"HTTP {e.code}: {detail or e.reason}") from None
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        raise _Transient(f"{type(e).__name__}: {reason}") from None
    except ValueError as e:  # a 200 whose body is not JSON
        raise _Transient(f"invalid JSON in the response: {e}") from None


class ServerEngine(Engine):
    """An OpenAI-compatible client with ``concurrency`` requests in flight.

    Raw prompts go to ``/v1/completions``, chat messages to ``/v1/chat/completions``.
    Connection errors, timeouts and 5xx are retried with exponential backoff (``retries``
    times); a 4xx becomes an error completion with the server's reason. Before each retry
    ``check_server`` runs, so a dead server fails the shard at once, naming its log, instead of
    retrying into the void.
    """

    def __init__(
        self,
        url: str,
        model: str,
        decoding: Decoding,
        *,
        concurrency: int = 32,
        request_timeout_s: float = 3600.0,
        retries: int = 5,
        backoff_s: float = 1.0,
        check_server: Callable[[], None] | None = None,
        limit: PromptLimit | None = None,
        describe: str | None = None,
    ):
        self.url = url.rstrip("/")
        self.model, self.decoding = model, decoding
        self.concurrency = max(1, concurrency)
        self.request_timeout_s = request_timeout_s
        self.retries, self.backoff_s = retries, backoff_s
        self.check_server = check_server
        self.limit = limit
        self.describe = describe or f"the server at {self.url}"
        self.sent = 0  # requests sent, retries not counted (for the attempt log)
        self.finished = 0

    def payload(self, req: Request) -> tuple[str, dict[str, Any]]:
        """(endpoint, JSON body) for one request."""
        d = self.decoding
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": d.max_new_tokens,
            "temperature": d.temperature,
            "seed": req.seed,
        }
        if d.temperature > 0:
            body["top_p"] = d.top_p
        if d.stop:
            body["stop"] = list(d.stop)
        if isinstance(req.prompt, str):
            return f"{self.url}/v1/completions", {**body, "prompt": req.prompt}
        return f"{self.url}/v1/chat/completions", {**body, "messages": req.prompt}

    def complete(self, req: Request) -> Completion:
        """One request, with retries; raises EngineError when it cannot be served at all."""
        from cot.generation import cut_after_final_answer, cut_at_stop

        if self.limit is not None:
            reason = self.limit.error(self.limit.length(req.prompt))
            if reason:
                return Completion("", 0, error=reason)
        endpoint, body = self.payload(req)
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                if self.check_server is not None:
                    self.check_server()
                delay = self.backoff_s * 2 ** (attempt - 1) * (1 + 0.25 * random.random())
                time.sleep(delay)
            try:
                resp = post_json(endpoint, body, self.request_timeout_s)
            except _Refused as e:
                return Completion("", 0, error=f"refused by the server: {e}")
            except _Transient as e:
                last = str(e)
                log.warning(f"{req.key}: {last} (try {attempt + 1} of {self.retries + 1})")
                continue
            try:
                choice = resp["choices"][0]
                text = choice["text"] if "text" in choice else choice["message"]["content"]
                tokens = int((resp.get("usage") or {}).get("completion_tokens") or 0)
            except (KeyError, IndexError, TypeError, ValueError):
                return Completion("", 0, error=f"malformed response: {json.dumps(resp)[:300]}")
            text = cut_at_stop(text or "", self.decoding.stop)
            if self.decoding.stop_at_answer:
                text = cut_after_final_answer(text)
            return Completion(text, tokens)
        if self.check_server is not None:
            self.check_server()
        raise EngineError(
            f"{self.describe}: request {req.key} failed {self.retries + 1} times; last error: "
            f"{last}"
        )

    def run(
        self, requests: Sequence[Request], should_stop: StopCheck = never
    ) -> Iterator[tuple[Request, Completion]]:
        todo: queue.Queue[Request | None] = queue.Queue()
        done: queue.Queue[tuple[Request, Completion | BaseException]] = queue.Queue()
        quit_ = threading.Event()

        def worker() -> None:
            while not quit_.is_set():
                req = todo.get()
                if req is None:
                    return
                try:
                    result: Completion | BaseException = self.complete(req)
                except BaseException as e:  # handed to the main thread, which raises it
                    result = e
                done.put((req, result))

        # Daemon threads: a signal that ends the task must not wait for requests in flight.
        threads = [
            threading.Thread(target=worker, daemon=True, name=f"client-{i}")
            for i in range(min(self.concurrency, len(requests)))
        ]
        for t in threads:
            t.start()
        pending = iter(requests)
        in_flight = 0
        try:
            while True:
                while in_flight < self.concurrency and not should_stop():
                    nxt = next(pending, None)
                    if nxt is None:
                        break
                    todo.put(nxt)
                    self.sent += 1
                    in_flight += 1
                if in_flight == 0:
                    return
                try:
                    req, result = done.get(timeout=0.5)
                except queue.Empty:
                    if should_stop():
                        return
                    continue
                in_flight -= 1
                if isinstance(result, BaseException):
                    raise result
                self.finished += 1
                yield req, result
        finally:
            quit_.set()
            for _ in threads:
                todo.put(None)

    def close(self) -> None:
        return None


def gather(engine: Engine, requests: Iterable[Request]) -> dict[Key, Completion]:
    """Run every request to completion; completions by key (benchmarks and tests)."""
    reqs = list(requests)
    return {r.key: c for r, c in engine.run(reqs)}
