"""The shape of the house, checked from the source: import layers, no cycles, one backend seam.

Imports are read with ``ast`` from every module of ``cot/``, ``jobs/`` and ``hpc/``, the lazy
ones inside functions included. Each checker runs on the real tree and, in a self-test, on a
small tree built to break it, so that a checker that can never fail is itself caught.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("cot", "jobs", "hpc")

# The cluster layer's protocol modules: what a job may use (config, paths, shard files, ranks).
FOUNDATION = {
    "hpc",
    "hpc.errors",
    "hpc.config",
    "hpc.layout",
    "hpc.shards",
    "hpc.runs",
    "hpc.distributed",
    "hpc.logs",
    "hpc.locks",
    "hpc.fingerprint",
}
BACKEND_WORDS = re.compile(
    r"""(==|!=)\s*["'](slurm|local)["']|["'](slurm|local)["']\s*(==|!=)"""
    r"""|\bin\s*[(\[{]\s*["'](slurm|local)["']"""
)


def modules(root: Path) -> dict[str, Path]:
    """Module name -> file, for every .py file of the packages under ``root``."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    """The project modules ``path`` imports, at any depth of the code (lazy imports too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name in known:
                found.add(name)
    return found


def graph(root: Path) -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    mods = modules(root)
    return {m: imports(p, set(mods)) - {m} for m, p in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def wrong_direction(g: dict[str, set[str]]) -> list[str]:
    """Imports against ``cot`` <- ``jobs`` <- ``hpc``: the core imports nothing of the cluster
    layer, jobs never import the CLI or the orchestration, the foundation never the layers
    above it."""
    bad = []
    for mod, deps in sorted(g.items()):
        for dep in sorted(deps):
            if mod.startswith("cot") and not dep.startswith("cot"):
                bad.append(f"{mod} -> {dep} (cot/ imports nothing from hpc/ or jobs/)")
            elif mod.startswith("jobs") and dep.startswith("hpc") and dep not in FOUNDATION:
                bad.append(f"{mod} -> {dep} (jobs/ uses only hpc's protocol modules)")
            elif mod in FOUNDATION and not (dep.startswith("cot") or dep in FOUNDATION):
                bad.append(f"{mod} -> {dep} (the protocol modules import no layer above)")
            elif mod.startswith("hpc.backends") and dep.startswith(("hpc.stages", "jobs")):
                bad.append(f"{mod} -> {dep} (backends know no stage)")
    return bad


def backend_branches(root: Path) -> list[str]:
    """Lines outside ``hpc/backends`` that compare against a backend's name."""
    hits = []
    for mod, path in modules(root).items():
        if mod.startswith("hpc.backends"):
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if BACKEND_WORDS.search(line.split("#")[0]):
                hits.append(f"{path.relative_to(root)}:{n}: {line.strip()}")
    return hits


# --------------------------------------------------------------------------- the real tree


def test_no_import_cycle_lazy_imports_included() -> None:
    assert cycles(graph(REPO)) == []


def test_imports_point_one_way() -> None:
    assert wrong_direction(graph(REPO)) == []


def test_no_backend_branch_outside_the_backends_package() -> None:
    assert backend_branches(REPO) == []


def test_every_package_says_what_it_is_for() -> None:
    for init in [*(REPO / p / "__init__.py" for p in PACKAGES), *REPO.glob("hpc/*/__init__.py")]:
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and doc.splitlines()[0].strip(), f"{init}: no opening line"


# --------------------------------------------------------------------------- the checkers fail


def _tree(root: Path, files: dict[str, str]) -> Path:
    for pkg in PACKAGES:
        (root / pkg).mkdir(parents=True, exist_ok=True)
        (root / pkg / "__init__.py").write_text('"""x."""\n')
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_a_lazy_cycle_is_caught(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "hpc/launch.py": "def f():\n    from hpc import pipeline\n",
            "hpc/pipeline.py": "from jobs.train import Train\n",
            "jobs/train.py": "def main():\n    from hpc.launch import build_parser\n",
        },
    )
    assert cycles(graph(root)) == [["hpc.launch", "hpc.pipeline", "jobs.train"]]
    assert "jobs.train -> hpc.launch (jobs/ uses only hpc's protocol modules)" in (
        wrong_direction(graph(root))
    )


@pytest.mark.parametrize(
    "line",
    [
        "if cfg.cluster == 'slurm':",
        'if kind != "local":',
        'x = "slurm" == kind',
        'if kind in ("local", "debug"):',
    ],
)
def test_a_backend_branch_is_caught(tmp_path: Path, line: str) -> None:
    root = _tree(tmp_path, {"hpc/stages/x.py": f"def f(cfg, kind):\n    {line}\n        pass\n"})
    assert backend_branches(root) == [f"hpc/stages/x.py:2: {line}"]
    _tree(tmp_path, {"hpc/stages/x.py": "KIND = 'slurm'  # a name, not a branch\n"})
    assert backend_branches(root) == []
