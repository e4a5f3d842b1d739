"""The operator's feedback loops at scale: 500 tiers and 200 budgets, a real Prometheus, a real
control plane. What one cycle of the SLA and spend observers costs (Prometheus queries, time,
operator CPU), the API writes they cause when something changes, and the writes of an idle minute.

Prometheus scrapes a synthetic exporter standing in for the sidecars of 50 namespaces (every
series an operator query reads, with the sidecars' names and labels: request and attempt counters,
the tier and backend latency histograms, each budget's own-spend gauges), so the operator's
queries and sums run on data of the right shape and size without 50 sidecars under load. The
exporter's counters grow at a steady rate; a "change" step makes ten backends slow and moves the
spend of twenty budgets, and the writes that follow are counted.

    .venv/bin/python bench/run_feedback.py            # ~6 min
    .venv/bin/python bench/run_feedback.py --quick    # 10 namespaces, shorter windows
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import procstat

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT / "hack"))

import localcluster  # noqa: E402  (hack/ is not a package)
from promserver import start_prometheus  # noqa: E402

TIERS_PER_NS, BUDGETS_PER_NS = 10, 4
BUCKETS = (
    "0.005",
    "0.01",
    "0.025",
    "0.05",
    "0.1",
    "0.25",
    "0.5",
    "1",
    "2.5",
    "5",
    "10",
    "30",
    "60",
    "120",
    "300",
    "+Inf",
)
FAST, SLOW = 0.05, 0.8  # seconds: what the exporter's latencies sit at


class Exporter:
    """Sidecar-shaped series for `namespaces` x TIERS_PER_NS tiers of two backends, and budgets."""

    def __init__(self, namespaces: int) -> None:
        self.namespaces = namespaces
        self.t0 = time.time()
        self.slow: set[tuple[str, str, str]] = set()  # (namespace, tier, backend)
        self.spend_factor: dict[tuple[str, str], float] = {}

    def _hist(self, name: str, labels: str, latency: float, count: float) -> list[str]:
        out = []
        for le in BUCKETS:
            n = count if le == "+Inf" or float(le) >= latency else 0.0
            out.append(f'{name}_bucket{{{labels},le="{le}"}} {n}')
        out.append(f"{name}_count{{{labels}}} {count}")
        out.append(f"{name}_sum{{{labels}}} {count * latency}")
        return out

    def render(self) -> str:
        elapsed = time.time() - self.t0
        n = 10.0 * elapsed  # requests per backend so far: 10 per second
        lines: list[str] = []
        for i in range(self.namespaces):
            ns = f"fb-{i}"
            for t in range(TIERS_PER_NS):
                tier = f"tier-{t}"
                slow_tier = False
                for b in ("a", "b"):
                    slow = (ns, tier, b) in self.slow
                    slow_tier = slow_tier or slow
                    lat = SLOW if slow else FAST
                    lab = f'namespace="{ns}",tier="{tier}",backend="{b}"'
                    lines.append(f'tierwise_requests_total{{{lab},tenant="none",code="200"}} {n}')
                    lines.append(f'tierwise_upstream_attempts_total{{{lab},result="ok"}} {n}')
                    lines += self._hist("tierwise_backend_first_byte_seconds", lab, lat, n)
                    lines += self._hist("tierwise_backend_duration_seconds", lab, lat, n)
                lab = f'namespace="{ns}",tier="{tier}"'
                lat = SLOW if slow_tier else FAST
                lines += self._hist("tierwise_time_to_first_byte_seconds", lab, lat, 2 * n)
                lines += self._hist("tierwise_request_duration_seconds", lab, lat, 2 * n)
            for k in range(BUDGETS_PER_NS):
                budget = f"budget-{k}"
                spent = 1.0 * self.spend_factor.get((ns, budget), 1.0)
                lab = f'budget_namespace="{ns}",budget="{budget}"'
                lines.append(f"tierwise_budget_own_spent_usd{{{lab}}} {spent}")
                lines.append(f"tierwise_budget_own_spent_tokens{{{lab}}} {int(spent * 100000)}")
                lines.append(f"tierwise_budget_own_reserved_usd{{{lab}}} 0")
                lines.append(f"tierwise_budget_own_reserved_tokens{{{lab}}} 0")
        return "\n".join(lines) + "\n"

    def serve(self) -> tuple[ThreadingHTTPServer, int]:
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = exporter.render().encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain; version=0.0.4")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except BrokenPipeError:
                    return  # Prometheus gave up on this scrape (it is stopping)

            def log_message(self, *_: Any) -> None:
                return None

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server, server.server_address[1]


def objects(namespaces: int) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for i in range(namespaces):
        ns = f"fb-{i}"
        docs.append({"apiVersion": "v1", "kind": "Namespace",
                     "metadata": {"name": ns, "labels": {"tierwise.dev/injection": "enabled"}}})  # fmt: skip
        for t in range(TIERS_PER_NS):
            docs.append({
                "apiVersion": "tierwise.dev/v1alpha1", "kind": "InferenceTier",
                "metadata": {"name": f"tier-{t}", "namespace": ns},
                "spec": {
                    "backends": [
                        {"name": b, "model": "m", "url": f"http://127.0.0.1:9/{b}/v1",
                         "pricing": {"inputPerMillion": 1, "outputPerMillion": 2}}
                        for b in ("a", "b")
                    ],
                    "slo": {"firstTokenP95Milliseconds": 400, "totalP95Milliseconds": 500, "windowSeconds": 60},
                    **({"access": {"default": True}} if t == 0 else {}),
                    **({"promotion": {"borrowFrom": "tier-0"}} if t == 1 else {}),
                },
            })  # fmt: skip
        for k in range(BUDGETS_PER_NS):
            docs.append({
                "apiVersion": "tierwise.dev/v1alpha1", "kind": "CostBudget",
                "metadata": {"name": f"budget-{k}", "namespace": ns},
                "spec": {"period": "Monthly", "limit": {"usd": 10.0}, "selector": {"tiers": [f"tier-{k}"]},
                         "thresholds": [{"percent": 50, "action": "Notify"}, {"percent": 100, "action": "Reject"}]},
            })  # fmt: skip
    return docs


METRIC = re.compile(r"^(\w+)(?:\{([^}]*)\})? (\S+)$")


def scrape(port: int) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        m = METRIC.match(line)
        if m:
            out[(m.group(1), m.group(2) or "")] = float(m.group(3))
    return out


def total(m: dict[tuple[str, str], float], name: str, **labels: str) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for (n, lab), v in m.items() if n == name and all(w in lab for w in want))


def window(port: int, pid: int, seconds: float) -> dict[str, Any]:
    """Counters of the operator over a window: per observer cycles, queries, time; writes; CPU."""
    a, cpu_a, t_a = scrape(port), procstat.cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    b, cpu_b, t_b = scrape(port), procstat.cpu_seconds(pid), time.monotonic()

    def d(name: str, **labels: str) -> float:
        return total(b, name, **labels) - total(a, name, **labels)

    observers = {}
    for o in ("slo", "spend", "autoscaler"):
        cycles = d("tierwise_operator_observe_duration_seconds_count", observer=o)
        observers[o] = {
            "cycles": int(cycles),
            "queries per cycle": round(d("tierwise_operator_prometheus_queries_total", observer=o) / cycles, 1)
            if cycles else None,
            "mean cycle time (s)": round(d("tierwise_operator_observe_duration_seconds_sum", observer=o) / cycles, 3)
            if cycles else None,
        }  # fmt: skip
    writes = {}
    for (name, lab), v in b.items():
        if name == "tierwise_operator_api_writes_total":
            got = v - a.get((name, lab), 0.0)
            if got:
                writes[lab] = int(got)
    return {
        "seconds": round(t_b - t_a, 1),
        "observers": observers,
        "API writes": writes,
        "API writes per minute": round(sum(writes.values()) * 60 / (t_b - t_a), 1),
        "operator CPU (s per minute)": round((cpu_b - cpu_a) * 60 / (t_b - t_a), 2),
        "reconciles": int(d("tierwise_operator_reconcile_duration_seconds_count")),
    }


def measure(
    cluster: localcluster.Cluster,
    exporter: Exporter,
    op: subprocess.Popen[bytes],
    health: int,
    *,
    namespaces: int,
    interval: float,
    idle_seconds: float,
) -> dict[str, Any]:
    docs = objects(namespaces)
    t0 = time.monotonic()
    cluster.kubectl("apply", "--server-side", "-f", "-", input="\n---\n".join(json.dumps(d) for d in docs))
    want_budgets = namespaces * BUDGETS_PER_NS

    def observed() -> int:
        got = json.loads(cluster.kubectl("get", "costbudgets", "-A", "-o", "json").stdout)["items"]
        return sum(1 for b in got if "spentUsd" in (b.get("status") or {}))

    deadline = time.monotonic() + 600
    while observed() < want_budgets:
        if time.monotonic() > deadline or op.poll() is not None:
            raise SystemExit("budgets not observed in time; see the operator's log")
        time.sleep(2)
    settled = time.monotonic() - t0
    time.sleep(2 * interval)  # every tier's first SLO observation written
    idle = window(health, op.pid, idle_seconds)
    # Change: ten backends turn slow, twenty budgets spend more.
    exporter.slow = {(f"fb-{i % namespaces}", f"tier-{2 + i % 8}", "a") for i in range(10)}
    exporter.spend_factor = {(f"fb-{i % namespaces}", f"budget-{i % BUDGETS_PER_NS}"): 6.0 for i in range(20)}
    changed = window(health, op.pid, 6 * interval)
    rss = procstat.rss_bytes(op.pid) / 2**20
    status = Path(f"/proc/{op.pid}/status").read_text()
    peak = int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]
    result = {
        "tiers": namespaces * TIERS_PER_NS,
        "budgets": want_budgets,
        "series scraped": len(exporter.render().splitlines()),
        "interval (s)": interval,
        "time until every budget's spend is in status (s)": round(settled, 1),
        "idle": idle,
        "after a change (10 backends slow, 20 budgets' spend moved)": changed,
        "operator RSS (MiB)": round(rss),
        "operator peak RSS (MiB)": round(peak),
        "CPU": procstat.cpu_model(),
    }
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--interval", type=float, default=10.0, help="SLO and spend interval of the operator")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args()
    namespaces = 10 if args.quick else 50
    idle_seconds = 30 if args.quick else 90
    tmp = Path(tempfile.mkdtemp(prefix="tierwise-feedback-"))
    exporter = Exporter(namespaces)
    server, exporter_port = exporter.serve()
    cluster = localcluster.start(tmp / "cluster")
    prom = start_prometheus(tmp / "prom", [f"127.0.0.1:{exporter_port}"], interval="10s")
    op = None
    try:
        cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(ROOT / "crds"))
        health = localcluster.free_port()
        env = {**os.environ, "TIERWISE_HEALTH_HOST": "127.0.0.1", "TIERWISE_LOG_LEVEL": "WARNING"}
        log = (tmp / "operator.log").open("wb")
        op = subprocess.Popen(
            [str(ROOT / ".venv" / "bin" / "tierwise"), "operator", "--kubeconfig", str(cluster.kubeconfig),
             "--health-port", str(health), "--prometheus-url", prom.url, "--slo-interval", str(args.interval),
             "--spend-interval", str(args.interval)],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
        result = measure(
            cluster, exporter, op, health, namespaces=namespaces, interval=args.interval, idle_seconds=idle_seconds
        )
        text = json.dumps(result, indent=2)
        print(text)
        if args.out:
            args.out.write_text(text + "\n")
        return 0
    finally:
        if op is not None:
            procstat.stop_group(op, 10)
        prom.stop()
        cluster.stop()
        server.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
