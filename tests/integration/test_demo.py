"""The README's demo, in a bounded form (a 10-second trace), checking what it prints: the savings
table before the cluster part, the cluster part, a summary; no terminal escape codes in a file."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(900)
def test_the_demo_shows_the_savings_first_then_the_cluster(tmp_path: Path) -> None:
    env = {**os.environ, "DEMO_TRACE_SECONDS": "10", "TMPDIR": str(tmp_path)}
    run = subprocess.run(["bash", "hack/demo.sh"], cwd=ROOT, env=env, capture_output=True, timeout=840, check=False)
    out = run.stdout.decode()
    assert run.returncode == 0, (out[-3000:], run.stderr.decode()[-3000:])
    assert "\x1b[" not in out
    saves, cluster, summary = (
        out.find("The Policy saves"),
        out.find("starting a local control plane"),
        out.find("== summary"),
    )
    assert -1 < saves < cluster < summary, out[-3000:]
    assert "fallback cycle" in out and "tier gold: priority 100" in out
    assert (tmp_path / "tierwise-demo" / "replay" / "report.json").exists()
