"""`tierwise replay` on a small trace through the quickstart Policy, as a user runs it: a real
process, fake providers, the report's parts adding up."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.conftest import TIERWISE
from tierwise.api.budget import Period
from tierwise.periods import window
from tierwise_sidecar.policy_source import CrFolder

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


def test_a_live_policy_from_its_configmap_starts_where_the_namespace_stands(tmp_path: Path) -> None:
    """A dry run against the live Policy: the ConfigMap as `kubectl get configmap -o yaml` prints it,
    on stdin, with the spend the operator published (tenant acme's daily budget used up) and its SLO
    steering (gold diverted to silver): the Policy strategy starts from both."""
    trace, out = tmp_path / "trace.jsonl", tmp_path / "out"
    _trace(trace)
    policy = CrFolder(ROOT / "examples" / "quickstart", None, "tierwise-system").load().policy
    acme_daily = window(Period.DAILY, "UTC", time.time()).id
    configmap = {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "tierwise-policy", "namespace": "default"},
        "data": {
            "policy.json": json.dumps(policy.wire()),
            "budgets.json": json.dumps({"budgets": {"default/tenant-acme-daily": {
                "window": acme_daily, "spentMicros": 20_000_000, "spentTokens": 0}}}),
            "steering.json": json.dumps({"tiers": {"gold": {"weights": {}, "divert": {
                "to": "silver", "reason": "gold misses its SLO", "percent": 100}}}}),
        },
    }  # fmt: skip
    run = subprocess.run(
        [*TIERWISE, "replay", str(trace), "--policy", "-", "--speed", "5", "--out", str(out)],
        input=yaml.safe_dump(configmap).encode(), capture_output=True, timeout=180, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    text = run.stdout.decode()
    assert "policy: ConfigMap default/tierwise-policy (live Policy sha256:" in text
    assert "with the budgets' spend, with the SLO steering" in text
    doc = json.loads((out / "report.json").read_text())
    s = doc["strategies"]
    # acme's budget was spent before the trace began: what the cache did not answer was refused.
    assert s["policy"]["refusals"].get("budget_exceeded", 0) > 0
    assert s["policy"]["by_tenant"]["acme"] == 0 and s["policy"]["by_tenant"]["globex"] > 0
    # Gold was steered to silver: nothing was served (or spent) as gold under the Policy.
    assert s["policy"]["by_tier"].get("gold", 0) == 0 and s["premium"]["by_tier"]["gold"] > 0
    # The premium and cheapest strategies keep no budgets and no steering.
    assert "budget_exceeded" not in s["premium"]["refusals"]


def test_a_bad_policy_input_is_refused_by_name(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    _trace(trace, 3)
    bad = {"kind": "ConfigMap", "metadata": {"name": "tierwise-policy"}, "data": {"policy.json": '{"tiers": 3}'}}
    run = subprocess.run(
        [*TIERWISE, "replay", str(trace), "--policy", "-", "--out", str(tmp_path / "out")],
        input=json.dumps(bad).encode(), capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == 1
    assert run.stderr.decode().startswith("error: stdin: ") and "Traceback" not in run.stderr.decode()
