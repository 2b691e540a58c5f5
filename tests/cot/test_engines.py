"""The server engine's client logic against a scripted HTTP server (retries, refusals, limits).

The real-server behaviour (transformers serve) is in tests/jobs/test_server_engine.py; here a
stdlib HTTP server answers what each test scripts, so every branch is hit in milliseconds.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from cot.engines import (
    Completion,
    Decoding,
    EngineError,
    PromptLimit,
    Request,
    ServerEngine,
    gather,
)
from cot.records import DurableAppender


class Script:
    """What the fake server answers: a queue of status codes per prompt (then 200)."""

    def __init__(self) -> None:
        self.codes: dict[str, list[int]] = {}
        self.bodies: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.delay_s = 0.0


@pytest.fixture()
def fake() -> Iterator[tuple[str, Script]]:
    script = Script()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a: Any) -> None:
            return None

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with script.lock:
                script.bodies.append(body)
                script.in_flight += 1
                script.max_in_flight = max(script.max_in_flight, script.in_flight)
            time.sleep(script.delay_s)
            key = body.get("prompt") or body["messages"][-1]["content"]
            codes = script.codes.get(key, [])
            code = codes.pop(0) if codes else 200
            if code == 200:
                text = f"{key} reversed: {key[::-1]}\nFinal Answer: 7\nand more after it"
                if "messages" in body:
                    choice: dict[str, Any] = {"message": {"role": "assistant", "content": text}}
                else:
                    choice = {"text": text}
                out = json.dumps({"choices": [choice], "usage": {"completion_tokens": 5}})
            else:
                out = json.dumps({"error": f"scripted {code}"})
            with script.lock:
                script.in_flight -= 1
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(out.encode())

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    # shutdown() waits for serve_forever's next poll: 0.5 s by default, for every test.
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", script
    srv.shutdown()


def _engine(url: str, **kw: Any) -> ServerEngine:
    return ServerEngine(url, "m", Decoding(max_new_tokens=8), backoff_s=0.01, **kw)


def test_completions_are_cut_after_the_answer_line_and_counted(
    fake: tuple[str, Script],
) -> None:
    url, script = fake
    out = gather(_engine(url), [Request(("a", 0), "abc", 1)])
    assert out[("a", 0)] == Completion("abc reversed: cba\nFinal Answer: 7", 5)
    assert script.bodies[0] == {
        "model": "m",
        "max_tokens": 8,
        "temperature": 0.0,
        "seed": 1,
        "prompt": "abc",
    }


def test_stop_strings_are_sent_and_applied_to_what_comes_back(fake: tuple[str, Script]) -> None:
    """A server that ignores ``stop`` (or stops after it) still gives the same cut text."""
    url, script = fake
    d = Decoding(max_new_tokens=8, stop=("\nFinal",))
    out = gather(ServerEngine(url, "m", d, backoff_s=0.01), [Request(("a", 0), "abc", 1)])
    assert out[("a", 0)].text == "abc reversed: cba"
    assert script.bodies[0]["stop"] == ["\nFinal"]
    gather(_engine(url), [Request(("b", 0), "x", 1)])
    assert "stop" not in script.bodies[1]  # no stop strings: none sent


def test_chat_prompts_go_to_chat_completions(fake: tuple[str, Script]) -> None:
    url, script = fake
    msgs = [{"role": "user", "content": "q"}]
    out = gather(_engine(url), [Request(("a", 0), msgs, 1)])
    assert out[("a", 0)].text == "q reversed: q\nFinal Answer: 7"
    assert script.bodies[0]["messages"] == msgs and "prompt" not in script.bodies[0]


def test_5xx_is_retried_and_4xx_becomes_an_error_record(fake: tuple[str, Script]) -> None:
    url, script = fake
    script.codes = {"flaky": [503, 500], "bad": [400]}
    reqs = [Request(("f", 0), "flaky", 0), Request(("b", 0), "bad", 0)]
    out = gather(_engine(url), reqs)
    assert out[("f", 0)].error is None and out[("f", 0)].text.startswith("flaky")
    assert out[("b", 0)].text == "" and "refused by the server: HTTP 400" in str(
        out[("b", 0)].error
    )
    assert sum(b["prompt"] == "flaky" for b in script.bodies) == 3  # 2 failures, then served


def test_retries_exhausted_fail_the_shard_and_ask_the_server_first(
    fake: tuple[str, Script],
) -> None:
    url, script = fake
    script.codes = {"down": [502] * 10}
    checks: list[int] = []
    eng = _engine(url, retries=2, check_server=lambda: checks.append(1))
    with pytest.raises(
        EngineError, match=r"request \('d', 0\) failed 3 times; last error: HTTP 502"
    ):
        gather(eng, [Request(("d", 0), "down", 0)])
    assert len(checks) == 3  # before each retry and before giving up


def test_a_dead_server_is_named_instead_of_retried(fake: tuple[str, Script]) -> None:
    url, script = fake
    script.codes = {"x": [503] * 10}

    def dead() -> None:
        raise EngineError("server (shard 0) died: killed by SIGKILL; log /x/00000.log")

    with pytest.raises(EngineError, match="died: killed by SIGKILL"):
        gather(_engine(url, check_server=dead), [Request(("x", 0), "x", 0)])


def test_no_more_than_concurrency_requests_in_flight(fake: tuple[str, Script]) -> None:
    url, script = fake
    script.delay_s = 0.05
    reqs = [Request((f"q{i}", 0), f"p{i}", 0) for i in range(20)]
    eng = _engine(url, concurrency=4)
    out = gather(eng, reqs)
    assert len(out) == 20 and script.max_in_flight == 4
    assert (eng.sent, eng.finished) == (20, 20)


def test_should_stop_sends_nothing_new(fake: tuple[str, Script]) -> None:
    url, script = fake
    script.delay_s = 0.05
    reqs = [Request((f"q{i}", 0), f"p{i}", 0) for i in range(20)]
    eng = _engine(url, concurrency=3)
    got = []
    for req, _ in eng.run(reqs, should_stop=lambda: len(got) >= 2):
        got.append(req.key)
    assert eng.sent <= len(got) + 3  # what was in flight when the stop came, no more
    assert len(got) < 20


class _Tok:
    """Counts whitespace words as tokens; enough for the limit's arithmetic."""

    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [0] * len(text.split())}


def test_an_overlong_prompt_is_an_error_record_and_never_sent(fake: tuple[str, Script]) -> None:
    url, script = fake
    limit = PromptLimit(_Tok(), max_positions=10, max_new_tokens=8)
    reqs = [Request(("s", 0), "one two", 0), Request(("l", 0), "a b c d e f", 0)]
    out = gather(_engine(url, limit=limit), reqs)
    assert out[("s", 0)].error is None
    assert out[("l", 0)].error == (
        "prompt too long: 6 prompt tokens + max_new_tokens 8 exceed the model's 10 positions"
    )
    assert [b["prompt"] for b in script.bodies] == ["one two"]


def test_durable_appender_flushes_each_line_and_fsyncs_within_the_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    synced: list[float] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(time.monotonic()), real(fd))[1])
    path = tmp_path / "s.jsonl"
    with DurableAppender(path, interval_s=0.05) as out:
        out.write([{"id": "a"}])
        assert path.read_text() == '{"id": "a"}\n'  # flushed: another process sees it now
        deadline = time.monotonic() + 2
        while not synced and time.monotonic() < deadline:
            time.sleep(0.01)
        assert synced, "no fsync within the interval"
        out.write([{"id": "b"}, {"id": "c"}])
    assert path.read_text().splitlines() == ['{"id": "a"}', '{"id": "b"}', '{"id": "c"}']
    assert len(synced) >= 2  # the close syncs what the interval had not
