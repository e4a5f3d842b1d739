"""`tierwise replay` on a small trace through the quickstart Policy, as a user runs it: a real
process, fake providers, the report's parts adding up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import TIERWISE

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = (
    "What is the capital of France?",
    "Write a Python function that merges two sorted lists, then explain its complexity step by step.",
    "Say hello.",
)


def _trace(path: Path, n: int = 45) -> None:
    with path.open("w") as f:
        for i in range(n):
            tier = ("gold", "silver", "bronze")[i % 3]
            body = {"model": tier, "messages": [{"role": "user", "content": PROMPTS[i % 3]}], "max_tokens": 64,
                    "temperature": 0}  # fmt: skip
            line = {"t": i * 0.1, "tier": tier, "tenant": ("acme", "globex")[i % 2], "body": body,
                    "label": "hard" if i % 3 == 1 else "easy"}  # fmt: skip
            f.write(json.dumps(line) + "\n")


def test_replay_reports_the_saving_by_cause_and_the_slo_per_tier(tmp_path: Path) -> None:
    trace, out = tmp_path / "trace.jsonl", tmp_path / "out"
    _trace(trace)
    run = subprocess.run(
        [*TIERWISE, "replay", str(trace), "--policy", str(ROOT / "examples" / "quickstart"), "--speed", "5",
         "--out", str(out)],
        capture_output=True, timeout=180, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    text = run.stdout.decode()
    assert "The Policy saves" in text and "\x1b[" not in text  # a file gets no terminal escape codes
    doc = json.loads((out / "report.json").read_text())
    s = doc["strategies"]
    assert s["premium"]["requests"] == s["policy"]["requests"] == 45
    assert doc["events"] == []  # no meta beside the trace: the requests alone
    assert s["policy"]["cost_usd"] < s["premium"]["cost_usd"]
    saving = doc["saving"]
    assert abs(sum(saving["byCause"].values()) - saving["usd"]) < 1e-9
    assert abs(saving["usd"] - (s["premium"]["cost_usd"] - s["policy"]["cost_usd"])) < 1e-9
    # Silver and bronze repeat their questions at temperature 0: the quickstart's cache answers them.
    assert saving["byCause"]["cache hits"] > 0 and s["policy"]["cache_hits"] > 0
    assert s["policy"]["sloCompliance"]["gold"] >= s["premium"]["sloCompliance"]["gold"]
    for name in ("cost.png", "latency.png", "cache.png", "budget.png"):
        assert (out / name).stat().st_size > 1000


def test_the_reference_trace_through_the_quickstart_costs_less_at_equal_gold_slo(tmp_path: Path) -> None:
    trace, out = tmp_path / "ref.jsonl", tmp_path / "out"
    subprocess.run(
        [sys.executable, "-m", "tierwise_sidecar.replay.tracegen", "--out", str(trace), "--duration", "20",
         "--spike-at", "8", "--spike-len", "4", "--outage-at", "15", "--outage-len", "2"],
        capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    run = subprocess.run(
        [*TIERWISE, "replay", str(trace), "--policy", str(ROOT / "examples" / "quickstart"), "--out", str(out)],
        capture_output=True,
        timeout=180,
        check=False,
    )
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    doc = json.loads((out / "report.json").read_text())
    s, saving = doc["strategies"], doc["saving"]
    assert s["policy"]["requests"] > 50
    assert abs(sum(saving["byCause"].values()) - saving["usd"]) < 1e-9
    assert s["policy"]["cost_usd"] < s["premium"]["cost_usd"]
    assert s["policy"]["sloCompliance"]["gold"] >= s["premium"]["sloCompliance"]["gold"]
    # The meta (written beside the trace) was applied: gpt-4o failed for 2 s, which every
    # strategy sending to it saw, and tenant acme's budget counted the Policy's requests.
    assert any("gpt-4o answers 503 from 15 s to 17 s" in e for e in doc["events"])
    assert "upstream_unavailable" in s["premium"]["refusals"]
    assert "upstream_unavailable" not in s["cheapest"]["refusals"]
    states = " ".join(s["policy"]["budget_states"])
    assert "default/trace-acme=" in states and "trace-acme" not in " ".join(s["premium"]["budget_states"])
    # The trace's budget is a small share of what acme would spend on premium: the Policy's run
    # crosses its thresholds (a Warning at least) before the end.
    assert "default/trace-acme=Warning" in states or "default/trace-acme=Downgraded" in states
