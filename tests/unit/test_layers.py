"""The layer contracts (pyproject.toml, [tool.importlinter]) hold, and they are not decoration: a
forbidden import added to a copy of the sources breaks them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).parent / "lint-imports"
SOURCE_ROOTS = ("api", "operator", "sidecar", "cli")


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(tree / r) for r in SOURCE_ROOTS)}
    return subprocess.run(
        [str(LINT), "--config", str(tree / "pyproject.toml"), "--no-cache"],
        cwd=tree, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def _copy(tmp: Path) -> Path:
    tree = tmp / "tree"
    tree.mkdir()
    shutil.copy(ROOT / "pyproject.toml", tree)
    for r in SOURCE_ROOTS:
        shutil.copytree(ROOT / r, tree / r, ignore=shutil.ignore_patterns("__pycache__"))
    return tree


def test_the_layers_hold() -> None:
    out = _lint(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 kept, 0 broken" in out.stdout


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("api/tierwise/policy.py", "tierwise_sidecar.metrics"),  # the core reaching into a component
        ("sidecar/tierwise_sidecar/route.py", "tierwise_operator.promql"),  # a component into the other
        ("operator/tierwise_operator/status.py", "tierwise_cli.main"),  # a component into the command
    ],
)
def test_a_forbidden_import_breaks_the_contract(tmp_path: Path, module: str, forbidden: str) -> None:
    tree = _copy(tmp_path)
    target = tree / module
    target.write_text(target.read_text() + f"\nimport {forbidden}  # noqa\n")
    out = _lint(tree)
    assert out.returncode != 0
    assert "BROKEN" in out.stdout and forbidden in out.stdout, out.stdout
