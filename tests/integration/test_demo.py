"""The README's demo, in a bounded form (a 10-second trace), checking what it prints: the savings
table before the cluster part, the cluster part with traffic through the injected sidecar (the
SLO breach drained, the budget's thresholds crossed, the dashboard's queries answered), a summary;
no terminal escape codes in a file."""

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
    traffic = out[out.find("traffic through the injected sidecar") :]
    assert "the injected container runs: tierwise sidecar --policy-file=" in out
    assert "gold   web       -> 200 served by gold/" in traffic
    assert "the operator drained openai-4o after" in traffic and "openai-4o 0\n" in traffic
    for state in ("=Warning: served by ", "=Downgraded, downgraded from gold: served by silver",
                  "429 budget_exceeded"):  # fmt: skip
        assert state in traffic, traffic[-3000:]
    assert "costbudget.tierwise.dev/promo-bot" in traffic  # kubectl get tierwise: spend and state
    assert "Requests by tier and status" in traffic and " series" in traffic
    assert (tmp_path / "tierwise-demo" / "replay" / "report.json").exists()
