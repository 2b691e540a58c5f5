"""Shared fixtures: the real test Slurm (tests/slurm_cluster.py) and the tiny models."""

from __future__ import annotations

import locale
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest_plugins = ["tests.slurm_cluster"]

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("COT_HPC_POLL_S", "2")
# Every CLI run of the tests (in-process and in subprocesses) gets the tiny-model demo settings
# unless it names a config; tests of the seed's defaults remove the variable.
os.environ["COT_HPC_CONFIG"] = str(REPO / "templates" / "demo.yaml")

from hpc import logs  # noqa: E402 - after the environment it reads

logs.setup()  # the same plain-line handler the CLI installs


@pytest.fixture(scope="session")
def dataset_dir() -> Path:
    """The committed, deterministic dataset (rebuilt if missing)."""
    from cot.dataset import write_splits

    d = REPO / "data"
    if not (d / "raw_questions.jsonl").exists():
        write_splits(d, seed=0)
    return d


@pytest.fixture(scope="session")
def tiny_models(dataset_dir: Path) -> Path:
    """models/tiny/{teacher,student}, built once through the CLI if missing."""
    from hpc.launch import main

    out = REPO / "models" / "tiny"
    assert main(["tiny-models", "--out-dir", str(out), "--data-dir", str(dataset_dir)]) == 0
    return out


@pytest.fixture()
def small_questions(tmp_path: Path, dataset_dir: Path) -> Path:
    """24 test questions in a file of their own."""
    lines = (dataset_dir / "test_questions.jsonl").read_text().splitlines()[:24]
    p = tmp_path / "q24.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


@pytest.fixture()
def ascii_locale() -> Iterator[None]:
    """The process's text encoding is ASCII (LC_CTYPE=C without UTF-8 mode), as on a node
    whose locale is unset; skipped under UTF-8 mode, where the locale never chooses it."""
    if sys.flags.utf8_mode:
        pytest.skip("UTF-8 mode: the locale never chooses the text encoding")
    old = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")
    try:
        yield
    finally:
        locale.setlocale(locale.LC_CTYPE, old)
