"""The CLI starts instantly and imports nothing heavy."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def run_py(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    return out.stdout


def test_help_imports_no_torch_or_transformers() -> None:
    code = (
        "import sys\n"
        "from hpc.launch import main\n"
        "for cmd in ([], ['generate'], ['train'], ['status'], ['merge']):\n"
        "    try:\n"
        "        main([*cmd, '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'transformers', 'peft', 'deepspeed', 'bitsandbytes', 'datasets')]\n"
        "print('HEAVY', heavy)\n"
    )
    out = run_py(code)
    assert "HEAVY []" in out, out[-500:]


def test_console_script_same_entry_point() -> None:
    import tomllib

    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert data["project"]["scripts"]["cot-hpc"] == "hpc.launch:main"


def test_status_imports_no_torch(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = run_py(
        "import sys\nfrom hpc.launch import main\n"
        f"main(['status', {str(tmp_path)!r}])\n"
        "print('TORCH', 'torch' in sys.modules)\n"
    )
    assert "TORCH False" in out
