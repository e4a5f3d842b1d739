"""What bench/run_overload.py measured, summed up: per-request records, the table per front and
tier, and the plot (latency over time per tier; what each tier got per second).

Kept apart from the run itself so the numbers can be re-read from a --raw file without running
anything: `python bench/overload_report.py RAW.json [PLOT.png]`.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import procstat
from run_proxy import cell

TIERS = ("gold", "silver", "bronze")
OUTCOMES = ("200", "200 degraded", "429 + Retry-After", "429, no Retry-After", "5xx", "client timeout", "other")
COLORS = {"gold": "#d4a017", "silver": "#7f8c8d", "bronze": "#a0522d"}


@dataclass(slots=True)
class Record:
    """One request as the client saw it. Times in seconds from the start of the load."""

    tier: str
    at: float  # when it was due (the open-loop schedule)
    sent: float  # when it was actually sent: `sent - at` is the load generator's own lag
    latency_ms: float
    status: int  # 0: no HTTP answer (timeout or connection error)
    outcome: str
    retry_after: str | None = None
    degraded: str | None = None
    code: str | None = None
    queue_wait_ms: float | None = None


def classify(status: int, retry_after: str | None, degraded: str | None, timed_out: bool) -> str:
    if timed_out:
        return "client timeout"
    if status == 200:
        return "200 degraded" if degraded else "200"
    if status == 429:
        return "429 + Retry-After" if retry_after else "429, no Retry-After"
    return "5xx" if status >= 500 else "other"


def percentile(values: list[float], p: float) -> float | None:
    """Nearest rank: an observed value, not an interpolation between two."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


def summarize(records: list[Record]) -> dict[str, dict[str, Any]]:
    """Per tier (and "all"): what was offered, what got through, how fast, and how the rest ended."""
    out: dict[str, dict[str, Any]] = {}
    for tier in (*TIERS, "all"):
        mine = [r for r in records if tier in ("all", r.tier)]
        ok = [r.latency_ms for r in mine if r.status == 200]
        refused = [r.latency_ms for r in mine if r.status == 429]
        out[tier] = {
            "offered": len(mine),
            "ok": len(ok),
            "success_pct": 100 * len(ok) / len(mine) if mine else None,
            "p50_ms": percentile(ok, 50),
            "p95_ms": percentile(ok, 95),
            "p99_ms": percentile(ok, 99),
            "refusal_p50_ms": percentile(refused, 50),
            # The longest wait for a slot the gateway reported (x-tierwise-queue-wait-ms) on any answer.
            "max_queue_wait_ms": max((r.queue_wait_ms for r in mine if r.queue_wait_ms is not None), default=None),
            "outcomes": {o: sum(1 for r in mine if r.outcome == o) for o in OUTCOMES},
            "codes": dict(Counter(r.code for r in mine if r.code)),
            # Refusals that still carry x-tierwise-degraded: degraded on the way in, then turned away.
            "refused_with_degraded_header": sum(1 for r in mine if r.status != 200 and r.degraded),
        }
    return out


def _ms(v: float | None) -> str:
    return "—" if v is None else f"{v:.0f}"


def table(summary: dict[str, dict[str, Any]]) -> str:
    head = (
        "| tier | offered | success | p50 | p95 | p99 | "
        + " | ".join(OUTCOMES)
        + " | 429 answered in (p50) | longest queue wait |"
    )
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for tier, s in summary.items():
        pct = "—" if s["success_pct"] is None else f"{s['success_pct']:.1f} %"
        cells = [tier, str(s["offered"]), pct, _ms(s["p50_ms"]), _ms(s["p95_ms"]), _ms(s["p99_ms"])]
        cells += [str(s["outcomes"][o]) for o in OUTCOMES]
        cells += [_ms(s[k]) + ("" if s[k] is None else " ms") for k in ("refusal_p50_ms", "max_queue_wait_ms")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def done(r: Record) -> float:
    return r.sent + r.latency_ms / 1000


def plot(
    fronts: dict[str, list[Record]],
    limits: list[tuple[float, float, int, int]],
    path: Path,
    *,
    slo_ms: float,
    capacity_rps: float,
    title: str,
) -> bool:
    """Top: each success's latency at the time it was sent (429s as crosses at their own latency),
    gold's SLO as a line. Bottom: 200s per second (by when they were answered) per tier against the
    backend's capacity, and tierwise's adaptive limit. False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: a file only
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = list(fronts)
    fig, axes = plt.subplots(
        2,
        len(names),
        figsize=(6.5 * len(names), 7.5),
        sharex=True,
        squeeze=False,
        gridspec_kw={"height_ratios": [3, 2]},
    )
    edges = list(range(math.ceil(max((done(r) for rs in fronts.values() for r in rs), default=1.0)) + 1))
    for col, name in enumerate(names):
        top, bottom = axes[0][col], axes[1][col]
        for tier in reversed(TIERS):  # gold drawn last, on top
            mine = [r for r in fronts[name] if r.tier == tier]
            ok = [r for r in mine if r.status == 200]
            no = [r for r in mine if r.status == 429]
            top.scatter(
                [r.sent for r in ok],
                [r.latency_ms for r in ok],
                s=4,
                alpha=0.5,
                color=COLORS[tier],
                label=f"{tier}: 200",
            )
            top.scatter(
                [r.sent for r in no],
                [max(r.latency_ms, 0.1) for r in no],
                s=6,
                marker="x",
                alpha=0.25,
                color=COLORS[tier],
                label=f"{tier}: 429",
            )
            # Successes by the second they were answered in (throughput); the last value closes the last step.
            per_second = Counter(int(done(r)) for r in ok)
            counts = [per_second.get(x, 0) for x in edges[:-1]]
            bottom.step(edges, [*counts, counts[-1]], where="post", color=COLORS[tier], label=f"{tier}: answered 200/s")
        gone = [r for r in fronts[name] if r.outcome == "client timeout"]
        top.scatter([r.sent for r in gone], [r.latency_ms for r in gone], s=8, marker="^", color="black",
                    alpha=0.3, label="client timeout (any tier)")  # fmt: skip
        top.axhline(slo_ms, color="red", linestyle="--", linewidth=1, label=f"gold SLO p95 {slo_ms:.0f} ms")
        top.set_yscale("log")
        top.set_title(name)
        bottom.axhline(capacity_rps, color="black", linestyle=":", linewidth=1, label="backend capacity (req/s)")
        bottom.set_xlabel("time since the load started (s)")
        if name.startswith("tierwise") and limits:
            twin = bottom.twinx()
            twin.step(
                [t for t, *_ in limits], [lim for _, lim, *_ in limits], where="post", color="purple", linewidth=1
            )
            twin.set_ylabel("tierwise's adaptive limit (slots)", color="purple")
            twin.set_ylim(bottom=0)
    # The same scales side by side (sharey would tie the limit's twin axis in as well).
    for row in axes:
        low = min(ax.get_ylim()[0] for ax in row)
        high = max(ax.get_ylim()[1] for ax in row)
        for ax in row:
            ax.set_ylim(low, high)
    axes[0][0].set_ylabel("latency (ms, log); x = 429")
    axes[1][0].set_ylabel("200s answered per second")
    handles, labels = axes[0][0].get_legend_handles_labels()
    more, more_labels = axes[1][0].get_legend_handles_labels()
    fig.legend([*handles, *more], [*labels, *more_labels], loc="lower center", ncol=6, fontsize=8, markerscale=3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def records_of(raw: list[dict[str, Any]]) -> list[Record]:
    return [Record(**r) for r in raw]


def dump(records: list[Record]) -> list[dict[str, Any]]:
    return [asdict(r) for r in records]


def cpu_table(results: dict[str, list[dict[str, Any]]], rounds: int) -> str:
    names = list(results)

    def row(label: str, values: dict[str, list[float]], fmt: str) -> str:
        return f"| {label} | " + " | ".join(cell(values[n], fmt, rounds) for n in names) + " |"

    cpu = {n: [r["cpu_ms_per_request"]["proxy"] for r in rs] for n, rs in results.items()}
    ratio = {n: [c / b for c, b in zip(cpu[n], cpu["minimal"], strict=True)] for n in names}
    other = {n: [r["cpu_s"]["other"] / r["elapsed_s"] for r in rs] for n, rs in results.items()}
    lines = [
        "| closed loop, 4 connections, 20 ms backend | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    lines.append(row("throughput (req/s)", {n: [r["rps"] for r in rs] for n, rs in results.items()}, "{:.0f}"))
    lines.append(
        row("latency p50 (ms)", {n: [r["latency_ms"]["p50"] for r in rs] for n, rs in results.items()}, "{:.1f}")
    )
    lines.append(row("proxy CPU per request (ms)", cpu, "{:.3f}"))
    lines.append(row("CPU per request vs minimal", ratio, "{:.2f}x"))
    lines.append(row("other CPU load while measuring (cores)", other, "{:.2f}"))
    errors = {n: sum(r["errors"] for r in rs) for n, rs in results.items()}
    if any(errors.values()):
        lines.append(f"\nnon-200 answers: {errors}")
    return "\n".join(lines)


def report(args: Any, sc: Any, fronts: dict[str, Any], cpu: dict[str, Any], version: str, *, slo_ms: int) -> None:
    """Print the tables, write the JSON summary (and the raw records when asked) and the plot."""
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    settings |= {"capacity_rps": sc.capacity_rps, "rate": sc.rate, "requests": len(sc.plan), "gold_slo_ms": slo_ms}
    doc: dict[str, Any] = {
        "title": sc.title,
        "code": version,
        "machine": f"{procstat.cpu_model()}, {os.cpu_count()} cores",
        "settings": settings,
    }
    for kind, f in fronts.items():
        summary, b = summarize(f["records"]), f["backend"]
        doc[kind] = {"summary": summary, "backend": b, "max_send_lag_s": f["max_send_lag_s"]}
        print(f"\n### {kind}\n\n{table(summary)}\n")
        print(
            f"backend: {b['requests']} requests, {b['overloaded']} answered 429, {b['queued']} queued, max "
            f"{b['max_in_flight']} in flight; load generator lag max {f['max_send_lag_s'] * 1000:.0f} ms"
        )
    limits = doc["limits"] = fronts["tierwise"]["limits"]
    if limits:
        values = [lim for _, lim, _, _ in limits]
        print(
            f"tierwise adaptive limit: median {statistics.median(values):.1f}, {min(values):.0f}..{max(values):.0f}"
            f" (last {values[-1]:.0f}); most waiting at once {max(w for *_, w in limits)}"
        )
    if cpu:
        doc["cpu"] = cpu
        print(f"\n### admission's CPU when nothing waits\n\n{cpu_table(cpu, args.cpu_rounds)}")
    records = {k: f["records"] for k, f in fronts.items()}
    if plot(records, limits, args.plot, slo_ms=slo_ms, capacity_rps=sc.capacity_rps, title=sc.title):
        print(f"\nplot: {args.plot}")
    else:
        print("\nno plot: matplotlib is not installed (pip install matplotlib)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"summary: {args.json}")
    if args.raw:
        raw = {
            "title": sc.title,
            "settings": settings,
            "limits": limits,
            "records": {k: dump(rs) for k, rs in records.items()},
        }
        args.raw.write_text(json.dumps(raw) + "\n")
        print(f"raw records: {args.raw}")


def main(argv: list[str]) -> int:
    doc = json.loads(Path(argv[0]).read_text())
    fronts = {name: records_of(rs) for name, rs in doc["records"].items()}
    for name, recs in fronts.items():
        print(f"\n{name}\n\n{table(summarize(recs))}")
    if len(argv) > 1:
        s = doc["settings"]
        plot(
            fronts,
            doc.get("limits", []),
            Path(argv[1]),
            slo_ms=s["gold_slo_ms"],
            capacity_rps=s["capacity_rps"],
            title=doc.get("title", ""),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
