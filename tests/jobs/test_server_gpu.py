"""The vLLM and SGLang presets for real, where a CUDA GPU and the package exist (else skipped).

The tiny teacher is served by the preset's own command line (``server_argv``), and its greedy
answers must agree with the ``hf`` engine's on at least 95% of the questions, as the
``transformers serve`` test asks on CPU.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

PACKAGES = {"vllm": "vllm", "sglang": "sglang"}


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


@pytest.mark.parametrize("preset", sorted(PACKAGES))
def test_preset_serves_the_tiny_teacher_like_the_hf_engine(
    preset: str, tiny_models: Path, dataset_dir: Path, tmp_path: Path
) -> None:
    if not _cuda():
        pytest.skip("needs a CUDA GPU")
    if importlib.util.find_spec(PACKAGES[preset]) is None:
        pytest.skip(f"{preset} is not installed")
    from cot import serving
    from cot.answers import extract_final_answer
    from cot.engines import Decoding, HFEngine, Request, ServerEngine, gather
    from cot.models import load_model, load_tokenizer
    from cot.prompts import TEACHER_TEMPLATE, load_template, render
    from cot.records import read_questions

    teacher = tiny_models / "teacher"
    qs = read_questions(dataset_dir / "test_questions.jsonl")
    t = load_template(TEACHER_TEMPLATE)
    reqs = [Request((q["id"], 0), render(t, q["question"]), 0) for q in qs]
    d = Decoding(max_new_tokens=160)
    hf = gather(HFEngine(load_model(teacher), load_tokenizer(teacher), d, batch_size=32), reqs)
    port = serving.free_port()
    argv = serving.server_argv(preset, model=str(teacher), port=port, gpus=1)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    log = tmp_path / "server.log"
    with serving.Server(argv, port=port, log_path=log, env=env, timeout_s=600) as srv:
        name = serving.served_models(srv.url)[0]
        out = gather(ServerEngine(srv.url, name, d, concurrency=64), reqs)
    agree = sum(
        extract_final_answer(hf[r.key].text) == extract_final_answer(out[r.key].text) for r in reqs
    )
    print(f"\n{preset}: agrees with hf on {agree}/{len(reqs)} answers")
    assert agree >= 0.95 * len(reqs)
    assert all(c.error is None and c.tokens > 0 for c in out.values())
