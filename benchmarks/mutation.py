"""Mutation score of the fast suite over the code that holds the README's promises.

    .venv/bin/python benchmarks/mutation.py [MUTANT_GLOB ...]     e.g. "cot.answers*"

Runs ``mutmut run`` over :data:`PROMISES` (or the globs given; pyproject.toml's
``[tool.mutmut]`` says which files are mutated and which tests run), then prints, per module, how
many single-point mutants the fast tests kill, and the score
``killed / (killed + survived + no tests + timeout)``. Every mutant in scope is run afresh, so
the score is that of the tests as they are now. Survivors are listed with ``mutmut show
NAME``-able names; those of the last measurement are judged one by one, with the reason each is
equivalent, in ``benchmarks/mutation_survivors.md``. Not part of CI: it runs the fast suite's
covering tests once per mutant (52 min on 2 cores for the whole scope; minutes for one module).
"""

from __future__ import annotations

import argparse
import collections
import fnmatch
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MUTMUT = [sys.executable, "-m", "mutmut"]

# The promises: answers, records, shards and the merge, locks, the fingerprint, the backends and
# the executor, the stage wiring, the shard loop, and of the training only its resume (the
# checkpoint markers, rotation, the torn-checkpoint choice, the ranks' stop agreement) and its
# loss mask: the rest of cot/training.py is model plumbing that only the slow tests run.
PROMISES = [
    "cot.answers.*",
    "cot.records.*",
    "hpc.shards.*",
    "hpc.backends.*",
    "hpc.stages.*",
    "hpc.locks.*",
    "hpc.fingerprint.*",
    "jobs.sharded.*",
    *(
        f"cot.training.x_{f}__mutmut_*"
        for f in (
            "answer_mask",
            "encode_example",
            "checkpoint_step",
            "list_checkpoints",
            "_manifest",
            "write_checkpoint_marker",
            "checkpoint_complete",
            "latest_complete_checkpoint",
            "checkpoints_to_delete",
            "rotate_checkpoints",
            "torn_after",
            "superseded_after",
            "start_step",
            "recorded_start",
            "started_from",
            "_explicit_start",
            "_choose_resume",
            "any_rank",
        )
    ),
]


def results() -> dict[str, str]:
    """mutant name -> status, for every mutant mutmut has run."""
    out = subprocess.run(
        [*MUTMUT, "results", "--all", "true"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    status = {}
    for line in out.splitlines():
        name, sep, state = line.strip().rpartition(": ")
        if sep:
            status[name] = state
    return status


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="mutant globs (default: PROMISES)")
    ap.add_argument("--no-run", action="store_true", help="only report the last run")
    args = ap.parse_args()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
    scope = args.names or PROMISES
    if not args.no_run:
        subprocess.run([*MUTMUT, "run", *scope], cwd=REPO, env=env, check=False)
    by_module: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    survivors: list[str] = []
    for name, state in sorted(results().items()):
        if state == "not checked" or not any(fnmatch.fnmatchcase(name, g) for g in scope):
            continue
        module = re.split(r"\.x[_ǁ]", name, maxsplit=1)[0]
        by_module[module][state] += 1
        if state != "killed":
            survivors.append(f"{name}: {state}")
    total = collections.Counter[str]()
    # score: killed / all. A timeout is a mutant that made a covering test hang (or, on a busy
    # machine, merely slow): Stryker counts it as detected, mutmut does not; both are printed.
    head = f"{'module':38} {'killed':>7} {'survived':>9} {'timeout':>8} {'other':>6} {'score':>6}"
    print(head + f" {'+timeout':>9}")

    def row(label: str, c: collections.Counter[str]) -> None:
        n = sum(c.values())
        other = n - c["killed"] - c["survived"] - c["timeout"]
        print(
            f"{label:38} {c['killed']:7} {c['survived']:9} {c['timeout']:8} {other:6} "
            f"{c['killed'] / n:6.1%} {(c['killed'] + c['timeout']) / n:9.1%}"
        )

    for module, c in sorted(by_module.items()):
        total.update(c)
        row(module, c)
    row("all", total)
    print(f"\n{len(survivors)} not killed (inspect one with: .venv/bin/mutmut show NAME):")
    for line in survivors:
        print("  " + line)


if __name__ == "__main__":
    main()
