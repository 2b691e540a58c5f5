"""Several samples per question: what a record samples depends on its key, never its batch."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpc.launch import main


def _generate(run: Path, questions: Path, teacher: Path, shards: int, batch: int) -> bytes:
    argv = [
        "generate", "--cluster", "local", "--run-dir", str(run), "--input", str(questions),
        "--num-samples", "5", "--teacher", str(teacher), "--shards", str(shards),
        "--batch-size", str(batch), "--samples-per-question", "4", "--temperature", "0.7",
        "--max-new-tokens", "32", "--quant", "none", "--seed", "3",
    ]  # fmt: skip
    assert main(argv) == 0
    return (run / "generate" / "merged.jsonl").read_bytes()


# Two whole local runs (two submitit processes each, ~13 s): in the full suite. The fast suite
# holds the same promise in-process: tests/cot/test_generation.py::
# test_a_sampled_record_is_the_same_in_any_batch.
@pytest.mark.slow
def test_four_samples_are_the_same_bytes_in_any_batching_and_sharding(
    tmp_path: Path, tiny_models: Path, small_questions: Path
) -> None:
    # A resumed shard batches what is left differently; this is the same change without Slurm.
    teacher = tiny_models / "teacher"
    one = _generate(tmp_path / "a", small_questions, teacher, shards=1, batch=16)
    other = _generate(tmp_path / "b", small_questions, teacher, shards=2, batch=3)
    assert one.count(b"\n") == 20
    assert one == other
