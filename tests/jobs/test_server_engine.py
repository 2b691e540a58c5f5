"""The server engine against a real ``transformers serve --continuous-batching`` process.

The tiny teacher is served on CPU exactly as a GPU node serves vLLM: a child process group on a
free port, an OpenAI-compatible API, the shard loop appending each completion as it finishes.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hpc import shards as S

pytest.importorskip("fastapi", reason="needs the serve extra (transformers serve)")
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The tiny teacher behind ``transformers serve`` (the preset command), for the module."""
    from cot import serving

    port = serving.free_port()
    argv = serving.server_argv("transformers", model=str(tiny_models / "teacher"), port=port)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    log = tmp_path_factory.mktemp("server") / "server.log"
    with serving.Server(argv, port=port, log_path=log, timeout_s=300, env=env) as srv:
        yield srv


def _questions(dataset_dir: Path, n: int) -> list[dict[str, Any]]:
    from cot.records import read_questions

    return read_questions(dataset_dir / "test_questions.jsonl")[:n]


@pytest.mark.parametrize("fmt", ["raw", "chat"])
def test_greedy_answers_agree_with_the_hf_engine(
    server: Any, tiny_models: Path, dataset_dir: Path, fmt: str
) -> None:
    """Raw prompts through /v1/completions, chat prompts through /v1/chat/completions (the
    server applies the ChatML template); the hf engine applies the same template locally."""
    from cot import serving
    from cot.answers import extract_final_answer
    from cot.engines import Decoding, HFEngine, Request, ServerEngine, gather
    from cot.models import load_model, load_tokenizer
    from cot.prompts import TEACHER_TEMPLATE, load_template, teacher_prompt

    qs = _questions(dataset_dir, 96)
    t = load_template(TEACHER_TEMPLATE)
    reqs = [Request((q["id"], 0), teacher_prompt(t, q["question"], fmt), 0) for q in qs]
    d = Decoding(max_new_tokens=160)
    tok = load_tokenizer(tiny_models / "teacher")
    hf = gather(HFEngine(load_model(tiny_models / "teacher"), tok, d, batch_size=16), reqs)
    model = serving.served_models(server.url)[0]
    srv = gather(ServerEngine(server.url, model, d, concurrency=16), reqs)
    answers = [
        (extract_final_answer(hf[r.key].text), extract_final_answer(srv[r.key].text)) for r in reqs
    ]
    agree = sum(a == b for a, b in answers)
    formatted = sum("Final Answer:" in srv[r.key].text for r in reqs)
    print(f"\n{fmt}: server agrees with hf on {agree}/{len(reqs)} answers, {formatted} formatted")
    assert agree >= 0.95 * len(reqs), answers
    assert formatted >= 0.9 * len(reqs)
    assert all(c.error is None and c.tokens > 0 for c in srv.values())


def _cfg(run: Path, inp: Path, tiny_models: Path, **extra: Any) -> Any:
    from hpc import config as C

    values = {
        "run_dir": str(run),
        "input": str(inp),
        "teacher": str(tiny_models / "teacher"),
        "temperature": 0.0,
        "max_new_tokens": 96,
        "cpus_per_task": 2,
        "engine": "server",
        **extra,
    }
    return C.resolve_paths(C.load_config(C.GenerateConfig, "generate", None, values))


def _plan(run: Path, inp: Path) -> None:
    S.write_or_check_plan(
        run / "generate", S.make_plan(inp, 1, 1, {"start_index": 0, "num_samples": None})
    )


def _ids(path: Path) -> list[str]:
    return [json.loads(x)["id"] for x in path.read_text().splitlines()]


def test_server_url_points_every_task_at_a_running_server(
    server: Any, tiny_models: Path, small_questions: Path, tmp_path: Path
) -> None:
    from jobs.generate import GenerateShard

    run = tmp_path / "run"
    _plan(run, small_questions)
    cfg = _cfg(run, small_questions, tiny_models, server_url=server.url, concurrency=8)
    out = GenerateShard()(cfg, 0)
    assert out["status"] == "complete" and out["generated"] == 24
    shard = S.shard_path(run / "generate", 0)
    assert _ids(shard) == _ids(small_questions)
    recs = [json.loads(x) for x in shard.read_text().splitlines()]
    assert sum("Final Answer:" in (r["cot"] or "") for r in recs) >= 20
    assert not (run / "generate" / "servers").exists()  # nothing was started
    assert server.alive()


@pytest.fixture()
def started(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every Server the shard task starts, in order (the real class, recorded)."""
    from cot import serving

    servers: list[Any] = []

    class Recorded(serving.Server):
        def __enter__(self) -> Any:
            servers.append(self)
            return super().__enter__()

    monkeypatch.setattr(serving, "Server", Recorded)
    return servers


def test_kill_9_of_the_server_fails_the_task_naming_it_and_the_relaunch_redoes_the_rest(
    tiny_models: Path, small_questions: Path, tmp_path: Path, started: list[Any]
) -> None:
    import signal

    from cot import serving
    from jobs.generate import GenerateShard

    run = tmp_path / "run"
    _plan(run, small_questions)
    shard = S.shard_path(run / "generate", 0)
    cfg = _cfg(run, small_questions, tiny_models, concurrency=2)

    def killer() -> None:
        while not (shard.exists() and len(shard.read_text().splitlines()) >= 4):
            time.sleep(0.05)
        os.kill(started[0].pid, signal.SIGKILL)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    with pytest.raises(serving.ServerError) as err:
        GenerateShard()(cfg, 0)
    t.join(5)
    msg = str(err.value)
    assert "server (shard 0) died" in msg and str(started[0].log_path) in msg
    assert not S.marker_path(run / "generate", 0).exists()
    on_disk = len(shard.read_text().splitlines())
    assert on_disk >= 4
    out = GenerateShard()(cfg, 0)
    assert out["status"] == "complete" and out["generated"] == 24 - on_disk
    assert _ids(shard) == _ids(small_questions)


def test_a_server_that_never_gets_healthy_fails_within_the_timeout_and_is_killed(
    tiny_models: Path, small_questions: Path, tmp_path: Path, started: list[Any]
) -> None:
    from cot import serving
    from jobs.generate import GenerateShard

    run = tmp_path / "run"
    _plan(run, small_questions)
    never = "{python} -c 'import time; time.sleep(600)' {model} {port}"
    cfg = _cfg(run, small_questions, tiny_models, server_command=never, server_timeout_s=3)
    t0 = time.monotonic()
    with pytest.raises(serving.ServerError, match=r"not healthy|never became healthy|within"):
        GenerateShard()(cfg, 0)
    assert time.monotonic() - t0 < 3 + 15
    pid = started[0].pid
    assert not serving._group_members(pid)  # the whole group is gone
    assert not S.marker_path(run / "generate", 0).exists()
