"""Value types (tierwise.values): frozen to the type checker, cheap slotted dataclasses at run time
that compare and hash by value."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

from tierwise.budgetrules import Amount
from tierwise.values import value

ROOT = Path(__file__).resolve().parents[2]
MYPY = Path(sys.executable).parent / "mypy"


@value
class _Point:
    x: int
    y: int = 0


def test_a_value_compares_and_hashes_by_value_and_has_no_instance_dict() -> None:
    assert _Point(1, 2) == _Point(1, 2) != _Point(2, 1)
    assert len({_Point(1, 2), _Point(1, 2), _Point(1)}) == 2
    assert {Amount(3, 4): "a"}[Amount(3, 4)] == "a"
    assert dataclasses.replace(_Point(1, 2), y=5) == _Point(1, 5)
    assert not hasattr(_Point(1), "__dict__"), "slotted"


def test_assigning_a_field_of_a_value_is_a_type_error(tmp_path: Path) -> None:
    snippet = tmp_path / "snippet.py"
    snippet.write_text(
        "from tierwise.budgetrules import Amount\n"
        "from tierwise_sidecar.route import Decision\n"
        "a = Amount(1, 2)\n"
        "a.micros = 5\n"
        "def f(d: Decision) -> None:\n"
        "    d.score = 1.0\n"
    )
    out = subprocess.run(
        [str(MYPY), "--strict", "--no-incremental", "--config-file", str(ROOT / "pyproject.toml"), str(snippet)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert out.returncode == 1, out.stdout + out.stderr
    assert 'snippet.py:4: error: Property "micros" defined in "Amount" is read-only' in out.stdout, out.stdout
    assert 'snippet.py:6: error: Property "score" defined in "Decision" is read-only' in out.stdout, out.stdout
