"""`tierwise replay TRACE --policy DIR`: what the Policy would save on a trace, side by side with
all traffic on the premium model and all on the cheapest; a table, a JSON report and plots."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tierwise.compiler import DEFAULT_PLATFORM_NAMESPACE
from tierwise_sidecar.policy_source import PolicyLoadError
from tierwise_sidecar.replay.events import NO_EVENTS, events_of
from tierwise_sidecar.replay.plots import plot_all
from tierwise_sidecar.replay.report import CAUSES, Catalog, Result, Summary, savings, summarize
from tierwise_sidecar.replay.runner import POLICY, PREMIUM, STRATEGIES, catalog_of, replay_all
from tierwise_sidecar.replay.source import load_input
from tierwise_sidecar.replay.trace import TraceError, read_trace
from tierwise_sidecar.replay.tracegen import read_meta


def add_command(sub: Any) -> None:
    r = sub.add_parser("replay", help="replay a trace of OpenAI requests: what the Policy saves, and at what SLO")
    r.add_argument("trace", type=Path, help="JSONL trace (docs/replay-trace.md)")
    r.add_argument("--policy", required=True, help="folder (or file) of InferenceTier/... YAML, a compiled "
                   "Policy, or the namespace's Policy ConfigMap (a live Policy: `kubectl get configmap "
                   "tierwise-policy -o yaml`; - reads stdin)")  # fmt: skip
    r.add_argument("-n", "--namespace", help="namespace to replay as (default: the one the files use)")
    r.add_argument("--platform-namespace", default=DEFAULT_PLATFORM_NAMESPACE)
    r.add_argument("--speed", type=float, default=10.0, help="replay this many times faster than the trace's clock")
    r.add_argument("--out", type=Path, default=Path("tierwise-replay"), help="folder for report.json and the plots")
    r.add_argument("--meta", type=Path, help="the trace's meta: its outage and budget (default: TRACE's "
                   "sibling NAME.meta.json when there is one)")  # fmt: skip
    r.add_argument("--no-meta", action="store_true", help="replay the requests alone, without the meta's events")
    r.set_defaults(func=_cmd_replay)


def meta_path(trace: Path, given: Path | None) -> Path | None:
    """The meta to apply: the one given (it must exist), else the trace's sibling by tracegen's
    convention (trace.jsonl -> trace.meta.json) when there is one."""
    if given is not None:
        return given
    sibling = trace.with_name(trace.name.removesuffix(".jsonl") + ".meta.json")
    return sibling if sibling.is_file() else None


def report_of(results: Mapping[str, Sequence[Result]], catalog: Catalog) -> dict[str, Any]:
    """The JSON report: every strategy's figures and the Policy's saving by cause."""
    summaries = {name: summarize(rs, catalog) for name, rs in results.items()}
    doc: dict[str, Any] = {"strategies": {n: _summary(s, catalog) for n, s in summaries.items()}}
    if POLICY in results and PREMIUM in results:
        by_cause = savings(results[POLICY], results[PREMIUM], catalog)
        premium = summaries[PREMIUM].cost_usd
        doc["saving"] = {
            "vs": PREMIUM,
            "usd": premium - summaries[POLICY].cost_usd,
            "percent": 100 * (premium - summaries[POLICY].cost_usd) / premium if premium else 0.0,
            "byCause": by_cause,
        }
    return doc


def _summary(s: Summary, catalog: Catalog) -> dict[str, Any]:
    out = asdict(s)
    out["sloCompliance"] = {tier: s.compliance(tier) for tier in sorted(s.slo)}
    hard, served = s.hard_on_strong
    out["hardOnStrongShare"] = hard / served if served else None
    return out


def table(doc: Mapping[str, Any]) -> str:
    """The terminal table: plain text, the same whatever the output is."""
    strategies = doc["strategies"]
    names = list(strategies)
    tiers = sorted({t for s in strategies.values() for t in s["sloCompliance"]})

    def pct(v: float | None) -> str:
        return "—" if v is None else f"{100 * v:.1f} %"

    rows = [["", *names], ["total cost (USD)", *(f"{strategies[n]['cost_usd']:.4f}" for n in names)]]
    rows.append(["requests served", *(f"{strategies[n]['served']}/{strategies[n]['requests']}" for n in names)])
    rows += [[f"{t}: within SLO", *(pct(strategies[n]["sloCompliance"].get(t)) for n in names)] for t in tiers]
    rows.append(["hard requests on a strong model", *(pct(strategies[n]["hardOnStrongShare"]) for n in names)])
    rows.append(["refusals", *(", ".join(f"{k} {v}" for k, v in strategies[n]["refusals"].items()) or "none"
                                for n in names)])  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    saving = doc.get("saving")
    if saving is not None:
        lines.append(f"\nThe Policy saves {saving['usd']:.4f} USD ({saving['percent']:.1f} %) against all-premium:")
        lines += [f"  {cause:<22} {saving['byCause'][cause]:.6f}" for cause in CAUSES if saving["byCause"][cause]]
    return "\n".join(lines)


def _cmd_replay(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.ERROR)  # the gateways' own log lines are not the report
    try:
        trace = read_trace(args.trace, sort=True)
        given = load_input(args.policy, args.namespace, args.platform_namespace, sys.stdin)
        policy = given.policy
        meta = None if args.no_meta else meta_path(args.trace, args.meta)
        events = events_of(read_meta(meta), policy) if meta is not None else NO_EVENTS
    except (TraceError, PolicyLoadError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not trace:
        print("error: the trace has no requests", file=sys.stderr)
        return 1
    print(f"policy: {given.described}")
    for line in events.describe():
        print(f"from {meta}: {line}")
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        tasks = {n: bar.add_task(f"replaying: {n}", total=len(trace)) for n in STRATEGIES}
        results = replay_all(trace, given, speed=args.speed, progress=lambda n, k: bar.advance(tasks[n], k),
                             events=events)  # fmt: skip
    catalog = catalog_of(policy)
    doc = report_of(results, catalog)
    doc["policy"] = given.described
    doc["events"] = events.describe()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(table(doc))
    print(f"\nreport: {args.out / 'report.json'}")
    plots = plot_all(results, catalog, args.out)
    print("plots: " + (", ".join(str(p) for p in plots) if plots else "none (pip install matplotlib)"))
    return 0
