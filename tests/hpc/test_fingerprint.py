"""Runs pinned to what made them: a relaunch with another teacher, prompt, decoding or training
setting is refused, naming each differing field, and nothing on disk changes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from hpc import config as C
from hpc import fingerprint
from hpc.errors import PlanError
from hpc.stages import GenerateStage
from hpc.stages.train import TrainStage

REPO = Path(__file__).resolve().parents[2]


def _gen(run: Path, inp: Path, teacher: Path, **more: Any) -> GenerateStage:
    values = {"run_dir": str(run), "input": str(inp), "teacher": str(teacher), "shards": 2,
              "cluster": "local", **more}  # fmt: skip
    return GenerateStage(C.load_config(C.GenerateConfig, "generate", None, values))


def _train(run: Path, student: Path, **more: Any) -> TrainStage:
    values = {"run_dir": str(run), "student": str(student), "cluster": "local", **more}
    return TrainStage(C.load_config(C.TrainConfig, "train", None, values))


def _launch(*stages: Any) -> None:
    """What the runner does before submitting: validate all, check all, then write."""
    produced: set[Path] = set()
    for st in stages:
        st.validate(produced)
        produced |= set(st.outputs())
    Path(stages[0].layout.root).mkdir(parents=True, exist_ok=True)
    for st in stages:
        st.refuse_changes()
    for st in stages:
        st.plan()


@pytest.fixture()
def setup(tmp_path: Path, tiny_models: Path, small_questions: Path) -> dict[str, Path]:
    run = tmp_path / "run"
    _launch(_gen(run, small_questions, tiny_models / "teacher"),
            _train(run, tiny_models / "student"))  # fmt: skip
    return {"run": run, "q": small_questions, "models": tiny_models}


def _refused(*stages: Any) -> str:
    with pytest.raises(PlanError) as e:
        _launch(*stages)
    return str(e.value)


def test_same_settings_relaunch_is_accepted(setup: dict[str, Path]) -> None:
    run, m = setup["run"], setup["models"]
    _launch(_gen(run, setup["q"], m / "teacher", batch_size=3), _train(run, m / "student"))


@pytest.mark.parametrize(
    ("change", "field", "old", "new"),
    [
        ({"temperature": 0.0}, "decoding.temperature", "0.7", "0.0"),
        ({"top_p": 0.9}, "decoding.top_p", "1.0", "0.9"),
        ({"max_new_tokens": 64}, "decoding.max_new_tokens", "512", "64"),
        ({"seed": 3}, "decoding.seed", "0", "3"),
        ({"samples_per_question": 2}, "decoding.samples", "1", "2"),
        ({"engine": "server", "server_url": "http://h:1/v1"}, "engine.engine", "hf", "server"),
    ],
)
def test_other_decoding_or_engine_is_refused_naming_old_and_new(
    setup: dict[str, Path], change: dict[str, Any], field: str, old: str, new: str
) -> None:
    run = setup["run"]
    before = (run / "config.yaml").read_bytes()
    msg = _refused(_gen(run, setup["q"], setup["models"] / "teacher", **change))
    assert f"{run / 'generate' / 'fingerprint.json'}: refusing" in msg
    assert f"{field}: {old} -> {new}" in msg, msg
    assert (run / "config.yaml").read_bytes() == before


def test_another_teacher_is_refused(setup: dict[str, Path], tmp_path: Path) -> None:
    other = tmp_path / "teacher2"
    shutil.copytree(setup["models"] / "teacher", other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5
    (other / "config.json").write_text(json.dumps(cfg))
    msg = _refused(_gen(setup["run"], setup["q"], other))
    assert f"teacher.path: {setup['models'] / 'teacher'} -> {other}" in msg
    assert "teacher.files.config.json: sha256 " in msg


def test_the_same_path_with_other_weights_is_refused(
    setup: dict[str, Path], tmp_path: Path
) -> None:
    """A model folder replaced in place (another download into models/teacher)."""
    teacher = setup["models"] / "teacher"
    pinned = fingerprint.model(teacher)
    (weights,) = teacher.glob("*.safetensors")
    saved = tmp_path / "saved.safetensors"
    shutil.copy2(weights, saved)
    try:
        with open(weights, "ab") as fh:  # same header, another size: other weights
            fh.write(b"\0" * 8)
        assert fingerprint.model(teacher) != pinned
        msg = _refused(_gen(setup["run"], setup["q"], teacher))
        assert f"teacher.files.{weights.name}: sha256" in msg
    finally:
        shutil.copy2(saved, weights)


def test_another_prompt_template_is_refused(setup: dict[str, Path], tmp_path: Path) -> None:
    tpl = tmp_path / "t.txt"
    tpl.write_text((REPO / "templates/prompts/teacher.txt").read_text() + "Be brief.\n")
    msg = _refused(_gen(setup["run"], setup["q"], setup["models"] / "teacher",
                        prompt_template=str(tpl)))  # fmt: skip
    assert "prompt_template: sha256 " in msg


def test_a_pipeline_refused_at_train_changes_nothing(setup: dict[str, Path]) -> None:
    """generate's settings are the pinned ones, train's lr is not: nothing is written, not
    even generate's part of config.yaml (which the same-settings generate would rewrite)."""
    run, m = setup["run"], setup["models"]
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    msg = _refused(_gen(run, setup["q"], m / "teacher", batch_size=5),
                   _train(run, m / "student", lr=1e-3))  # fmt: skip
    assert "hyperparameters.lr: 0.0002 -> 0.001" in msg
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files


def test_training_data_outside_the_run_is_pinned_by_content(
    tmp_path: Path, tiny_models: Path
) -> None:
    run, data = tmp_path / "run", tmp_path / "train.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "cot": "2\nFinal answer: 2"}) + "\n")
    _launch(_train(run, tiny_models / "student", data=str(data)))
    data.write_text(json.dumps({"question": "1+2?", "cot": "3\nFinal answer: 3"}) + "\n")
    msg = _refused(_train(run, tiny_models / "student", data=str(data)))
    assert "data.sha256: sha256 " in msg


def test_differences_name_nested_fields() -> None:
    old = {"a": {"b": 1, "c": "x"}, "d": None}
    new = {"a": {"b": 2, "c": "x"}, "e": 1}
    assert fingerprint.differences(old, new) == [
        "a.b: 1 -> 2",
        "d: null -> (none)",
        "e: (none) -> 1",
    ]


def test_a_field_set_to_the_text_none_differs_from_a_missing_one() -> None:
    # "(none)" is how a missing field is printed, not a value a field can be mistaken for
    base = {"seed": 1}
    set_ = {"seed": 1, "note": "(none)"}
    assert fingerprint.differences(base, set_) == ['note: (none) -> "(none)"']
    assert fingerprint.differences(set_, base) == ['note: "(none)" -> (none)']
    assert fingerprint.differences(set_, set_) == []


def test_only_a_sha256_is_shortened_in_a_difference() -> None:
    digest, other = "0123456789abcdef" * 4, "0123456789abcdeX" * 4  # 64 characters each
    assert fingerprint.differences({"w": digest}, {"w": other}) == [
        f"w: sha256 0123456789ab -> {other}"
    ]


def test_values_that_print_alike_are_shown_as_json() -> None:
    """A refusal never reads ``x: 1 -> 1``: values that differ but print alike are quoted."""
    assert fingerprint.differences({"a": 1}, {"a": "1"}) == ['a: 1 -> "1"']
    assert fingerprint.differences({"a": None}, {"a": "null"}) == ['a: null -> "null"']
    one, two = "ab" * 6 + "0" * 52, "ab" * 6 + "1" * 52  # the same first 12 characters
    assert fingerprint.differences({"w": one}, {"w": two}) == [f'w: "{one}" -> "{two}"']
