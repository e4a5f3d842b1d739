"""The replay's plots, one PNG each (matplotlib, Agg: no display needed): cumulative cost over the
trace per strategy, latency per tier against its SLO, the cache hit ratio over time, and the
spend per tenant over time (what a budget burns)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

from tierwise_sidecar.replay.report import Catalog, Result

BUCKETS = 40


def _bucket_edges(results: Mapping[str, Sequence[Result]]) -> float:
    end = max((r.t for rs in results.values() for r in rs), default=0.0)
    return max(end / BUCKETS, 1e-9)


def plot_all(results: Mapping[str, Sequence[Result]], catalog: Catalog, out: Path) -> list[Path]:
    """Write the plots into `out`; the files written (none when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out.mkdir(parents=True, exist_ok=True)
    files = []
    width = _bucket_edges(results)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, rs in results.items():
        ordered = sorted(rs, key=lambda r: r.t)
        total, xs, ys = 0.0, [], []
        for r in ordered:
            total += r.cost_usd
            xs.append(r.t)
            ys.append(total)
        ax.plot(xs, ys, label=name)
    ax.set(xlabel="trace time (s)", ylabel="cumulative cost (USD)", title="Cost over the trace, per strategy")
    ax.legend()
    files.append(_save(fig, out / "cost.png", plt))

    policy = results.get("policy") or next(iter(results.values()))
    tiers = sorted({r.tier for r in policy})
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for tier in tiers:
        served = [r for r in policy if r.tier == tier and r.status < 400]
        line = ax.scatter([r.t for r in served], [r.latency_s * 1000 for r in served], s=6, label=tier)
        slo = catalog.slo_s.get(tier)
        if slo is not None:
            ax.axhline(slo * 1000, color=line.get_facecolor()[0], linestyle="--", linewidth=1)
    ax.set(xlabel="trace time (s)", ylabel="latency (ms)", title="Latency per tier under the Policy (dashed: p95 SLO)")
    ax.set_yscale("log")
    ax.legend()
    files.append(_save(fig, out / "latency.png", plt))

    hits: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for r in policy:
        b = hits[int(r.t / width)]
        b[0] += r.cached
        b[1] += 1
    fig, ax = plt.subplots(figsize=(8, 4.5))
    keys = sorted(hits)
    ax.step([k * width for k in keys], [hits[k][0] / hits[k][1] for k in keys], where="post")
    ax.set(xlabel="trace time (s)", ylabel="hit ratio", title="Cache hits under the Policy", ylim=(0, 1))
    files.append(_save(fig, out / "cache.png", plt))

    fig, ax = plt.subplots(figsize=(8, 4.5))
    spend: dict[str, list[tuple[float, float]]] = defaultdict(list)
    running: dict[str, float] = defaultdict(float)
    for r in sorted(policy, key=lambda r: r.t):
        tenant = r.tenant or "none"
        running[tenant] += r.cost_usd
        spend[tenant].append((r.t, running[tenant]))
    for tenant, points in sorted(spend.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], label=tenant)
    ax.set(xlabel="trace time (s)", ylabel="spend (USD)", title="Spend per tenant under the Policy (budget burn)")
    ax.legend()
    files.append(_save(fig, out / "budget.png", plt))
    return files


def _save(fig: object, path: Path, plt: object) -> Path:
    fig.tight_layout()  # type: ignore[attr-defined]
    fig.savefig(path, dpi=110)  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[attr-defined]
    return path
