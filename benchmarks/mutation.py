"""Mutation score of the fast suite over the modules that hold the README's promises.

    .venv/bin/python benchmarks/mutation.py [MUTANT_GLOB ...]     e.g. "cot.answers*"

Runs ``mutmut run`` (configured in pyproject.toml's ``[tool.mutmut]``: which modules, which
tests), then prints, per module, how many single-point mutants the fast tests kill, and the
score ``killed / (killed + survived + no tests + timeout)``. Survivors are listed with
``mutmut show NAME``-able names. Not part of CI: it runs the fast suite's covering tests once per
mutant (an hour or more on 2 cores for every module; minutes for one).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MUTMUT = [sys.executable, "-m", "mutmut"]


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
    ap.add_argument("names", nargs="*", help="mutant globs (default: every configured module)")
    ap.add_argument("--no-run", action="store_true", help="only report the last run")
    args = ap.parse_args()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
    if not args.no_run:
        subprocess.run([*MUTMUT, "run", *args.names], cwd=REPO, env=env, check=False)
    by_module: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    survivors: list[str] = []
    for name, state in sorted(results().items()):
        if state == "not checked":  # outside the globs given
            continue
        module = re.split(r"\.x[_ǁ]", name, maxsplit=1)[0]
        by_module[module][state] += 1
        if state != "killed":
            survivors.append(f"{name}: {state}")
    total = collections.Counter[str]()
    print(f"{'module':38} {'killed':>7} {'survived':>9} {'other':>6} {'score':>6}")
    for module, c in sorted(by_module.items()):
        total.update(c)
        other = sum(v for k, v in c.items() if k not in ("killed", "survived"))
        n = sum(c.values())
        print(f"{module:38} {c['killed']:7} {c['survived']:9} {other:6} {c['killed'] / n:6.1%}")
    n = sum(total.values())
    other = sum(v for k, v in total.items() if k not in ("killed", "survived"))
    print(
        f"{'all':38} {total['killed']:7} {total['survived']:9} {other:6} {total['killed'] / n:6.1%}"
    )
    print(f"\n{len(survivors)} not killed (inspect one with: .venv/bin/mutmut show NAME):")
    for line in survivors:
        print("  " + line)


if __name__ == "__main__":
    main()
