"""Cache benchmark: what a hit costs in each layer, and what a cache saves on a Zipf trace.

Part 1, side by side on the same fake backend (the proxy under test on one core, the backend, the
load generator and the stores on the other), interleaved rounds: the minimal aiohttp proxy (every
request goes to the backend), the gateway without a cache (the proxied path), the gateway
answering from L1 (memory), L2 (Redis), L3 (SQLite and PostgreSQL), and LiteLLM's proxy with its
Redis cache. The same body every time (temperature 0): after the first request, every answer is a
hit. Latency at concurrency 1, throughput and CPU per request at 1 and 32.

Part 2, a Zipf-distributed trace (seeded: `--trace-requests` requests over `--trace-prompts`
distinct prompts, exponent `--zipf`) sent at concurrency 8 to the gateway with L1 of several sizes
and to LiteLLM with Redis: hit ratio (backend calls counted at the fake backend), time per request
and the gateway's RSS after the trace.

    .venv/bin/python bench/run_cache.py              # 3 rounds; ~12 min
    .venv/bin/python bench/run_cache.py --quick      # 1 round, short windows, small trace
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

import procstat
import run_proxy as rp

sys.path.insert(0, str(rp.ROOT / "hack"))
from pgserver import Postgres, start_postgres

SECRET_ENV = "TIERWISE_SECRET_CACHE_URL"
PHASES = (rp.Phase("c1", 1, False), rp.Phase("c32", 32, False))


def tier_yaml(backend_url: str) -> str:
    return f"""\
apiVersion: tierwise.dev/v1alpha1
kind: InferenceTier
metadata: {{name: standard, namespace: bench}}
spec:
  backends:
    - {{name: main, model: {rp.MODEL}, url: "{backend_url}", pricing: {{inputPerMillion: 0.15, outputPerMillion: 0.6}}}}
  access: {{default: true}}
"""


def cache_yaml(layers: str, max_entries: int = 10000) -> str:
    return f"""\
---
apiVersion: tierwise.dev/v1alpha1
kind: CachePolicy
metadata: {{name: bench, namespace: bench}}
spec:
  layers:
    memory: {{enabled: {"true" if layers == "memory" else "false"}, maxEntries: {max_entries}}}
    redis: {{enabled: {"true" if layers == "redis" else "false"}, connectionSecretRef: {{name: cache, key: url}}}}
    persistent: {layers_persistent(layers)}
"""


def layers_persistent(layers: str) -> str:
    if layers == "sqlite":
        return "{enabled: true, sqlitePath: SQLITE_PATH}"
    if layers == "postgres":
        return "{enabled: true, backend: PostgreSQL, connectionSecretRef: {name: cache, key: url}}"
    return "{enabled: false}"


class Stores:
    def __init__(self, redis_url: str, pg: Postgres, tmp: Path) -> None:
        self.redis_url, self.pg, self.tmp = redis_url, pg, tmp


def gateway(ctx: rp.Context, stores: Stores, name: str, layers: str | None, max_entries: int = 10000) -> rp.Target:
    policy = ctx.tmp / f"policy-{name}-{time.monotonic_ns()}"
    policy.mkdir()
    text = tier_yaml(ctx.backend_url)
    env = rp.base_env()
    if layers is not None:
        text += cache_yaml(layers, max_entries).replace("SQLITE_PATH", str(stores.tmp / f"{policy.name}.db"))
        if layers == "redis":
            env[SECRET_ENV] = stores.redis_url
        elif layers == "postgres":
            env[SECRET_ENV] = stores.pg.url
    (policy / "objects.yaml").write_text(text)
    port = rp.free_port()
    argv = [str(rp.TIERWISE), "gateway", "--policy", str(policy), "--namespace", "bench", "--host", rp.HOST,
            "--port", str(port)]  # fmt: skip
    server = rp.Server(name, argv, ctx.cpu_proxy, ctx.log_dir, env)
    server.start()
    return rp.Target(port, server)


def litellm_redis(ctx: rp.Context, stores: Stores) -> rp.Target:
    config = json.loads(rp.litellm_config(ctx.backend_url))
    host, port = stores.redis_url.removeprefix("redis://").split("/")[0].split(":")
    config["litellm_settings"]["cache"] = True
    config["litellm_settings"]["cache_params"] = {"type": "redis", "host": host, "port": int(port), "ttl": 3600}
    path = ctx.tmp / "litellm-cache.yaml"
    path.write_text(json.dumps(config, indent=2) + "\n")
    log_config = ctx.tmp / "litellm-uvicorn-log.json"
    log_config.write_text(json.dumps(rp.UVICORN_LOG_CONFIG))
    env = rp.base_env(**rp.LITELLM_ENV)
    for k in ("DATABASE_URL", "LITELLM_MASTER_KEY", "REDIS_HOST", "REDIS_URL"):
        env.pop(k, None)
    lport = rp.free_port()
    argv = [str(rp.LITELLM_VENV / "bin" / "litellm"), "--config", str(path), "--log_config", str(log_config),
            "--host", rp.HOST, "--port", str(lport), "--num_workers", "1"]  # fmt: skip
    server = rp.Server("litellm-redis", argv, ctx.cpu_proxy, ctx.log_dir, env)
    server.start()
    return rp.Target(lport, server)


CONFIGS: dict[str, tuple[str, Callable[[rp.Context, Stores], rp.Target]]] = {
    "minimal": ("minimal aiohttp (every request proxied)", lambda c, s: rp.start_minimal(c)),
    "tierwise": ("tierwise, no cache (proxied)", lambda c, s: gateway(c, s, "tierwise", None)),
    "l1": ("tierwise L1 hit (memory)", lambda c, s: gateway(c, s, "l1", "memory")),
    "l2": ("tierwise L2 hit (Redis)", lambda c, s: gateway(c, s, "l2", "redis")),
    "l3-sqlite": ("tierwise L3 hit (SQLite)", lambda c, s: gateway(c, s, "l3-sqlite", "sqlite")),
    "l3-postgres": ("tierwise L3 hit (PostgreSQL)", lambda c, s: gateway(c, s, "l3-postgres", "postgres")),
    "litellm-redis": ("LiteLLM + Redis cache hit", litellm_redis),
}


def load(args: argparse.Namespace, ctx: rp.Context, target: rp.Target, phase: rp.Phase) -> dict[str, Any]:
    assert target.server is not None
    argv = ["taskset", "-c", args.client_cpu, str(rp.PYTHON), str(rp.BENCH / "loadgen.py"), "--port",
            str(target.port), "--model", rp.MODEL, "--temperature", "0", "--concurrency", str(phase.concurrency),
            "--duration", str(args.duration), "--warmup", str(args.warmup), "--cpu-pid",
            f"proxy={target.server.pid}"]  # fmt: skip
    r = subprocess.run(argv, capture_output=True, text=True, timeout=args.warmup + args.duration + 60, check=False)
    if r.returncode != 0:
        raise rp.BenchError(f"load generator failed: {r.stderr[-800:]}")
    return dict(json.loads(r.stdout))


def backend_requests(ctx: rp.Context) -> int:
    with urllib.request.urlopen(f"http://{rp.HOST}:{ctx.backend_port}/fake/stats", timeout=10) as r:
        return int(json.loads(r.read())["requests"])


# ---------------------------------------------------------------------------------------- part 2


def zipf_trace(n: int, prompts: int, exponent: float, seed: int) -> list[int]:
    rng = random.Random(seed)
    weights = [1 / (k**exponent) for k in range(1, prompts + 1)]
    return rng.choices(range(prompts), weights=weights, k=n)


async def replay(port: int, trace: list[int], concurrency: int) -> float:
    """Send the trace (prompt i: "Question number i ..."); seconds it took."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in trace:
        queue.put_nowait(i)

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(rp.HOST, port)
        try:
            while not queue.empty():
                i = queue.get_nowait()
                ask = [{"role": "user", "content": f"Question number {i}: what is it?"}]
                body = json.dumps({"model": rp.MODEL, "temperature": 0, "max_tokens": 16, "messages": ask})
                writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {rp.HOST}\r\nContent-Type: "
                             f"application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())  # fmt: skip
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length"))  # fmt: skip
                await reader.readexactly(length)
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started


def part2(args: argparse.Namespace, ctx: rp.Context, stores: Stores, litellm: bool) -> list[dict[str, Any]]:
    trace = zipf_trace(args.trace_requests, args.trace_prompts, args.zipf, 7)
    distinct = len(set(trace))
    rows = []
    runs: list[tuple[str, Callable[[], rp.Target]]] = [
        (f"tierwise L1 maxEntries={n}", lambda n=n: gateway(ctx, stores, f"zipf{n}", "memory", n))  # type: ignore[misc]
        for n in args.l1_sizes
    ]
    if litellm:
        subprocess.run(["redis-cli", "-u", stores.redis_url, "FLUSHALL"], capture_output=True, check=False)
        runs.append(("LiteLLM + Redis cache", lambda: litellm_redis(ctx, stores)))
    for name, start in runs:
        target = start()
        try:
            rp.wait_ready(target.server, target.port, 120)
            before = backend_requests(ctx)
            assert target.server is not None
            cpu0 = procstat.tree_cpu_seconds(target.server.pid)
            seconds = asyncio.run(replay(target.port, trace, 8))
            cpu = procstat.tree_cpu_seconds(target.server.pid) - cpu0
            misses = backend_requests(ctx) - before
            rss = procstat.tree_rss_bytes(target.server.pid) / 2**20
            rows.append({"name": name, "hit_ratio": 1 - misses / len(trace), "best": 1 - distinct / len(trace),
                         "ms_per_request": 1000 * seconds / len(trace), "cpu_ms_per_request": 1000 * cpu / len(trace),
                         "rss_mb": rss})  # fmt: skip
            print(f"  {name}: hit ratio {rows[-1]['hit_ratio']:.3f}, {rows[-1]['ms_per_request']:.2f} ms/req, "
                  f"RSS {rss:.0f} MiB", file=sys.stderr, flush=True)  # fmt: skip
        finally:
            assert target.server is not None
            target.server.stop()
    return rows


# ---------------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--trace-requests", type=int, default=6000)
    p.add_argument("--trace-prompts", type=int, default=1500)
    p.add_argument("--zipf", type=float, default=1.1)
    p.add_argument("--l1-sizes", default="100,400,1500")
    p.add_argument("--proxy-cpu", default="0")
    p.add_argument("--client-cpu", default="1")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.quick:
        args.runs, args.duration, args.warmup, args.trace_requests, args.trace_prompts = 1, 1.0, 0.3, 2000, 500
    args.l1_sizes = [int(x) for x in args.l1_sizes.split(",")]
    return args


def run(args: argparse.Namespace, configs: list[str], litellm: bool, tmp: Path, pg: Postgres) -> tuple[Any, Any]:
    log_dir = tmp / "logs"
    bport = rp.free_port()
    backend = rp.Server("fake-backend", [str(rp.PYTHON), "-m", "tierwise_sidecar.fake_backend", "--host", rp.HOST,
                                         "--port", str(bport), "--completion-tokens", "16"],
                        args.client_cpu, log_dir, rp.base_env())  # fmt: skip
    backend.start()
    rp.wait_ready(backend, bport, 30)
    ctx = rp.Context(f"http://{rp.HOST}:{bport}/v1", backend.pid, bport, args.proxy_cpu, log_dir, tmp)
    redis_url, _ = rp.start_redis_server(args, tmp, log_dir)
    stores = Stores(redis_url, pg, tmp)
    rounds: list[dict[str, dict[str, Any]]] = []
    for i in range(args.runs):
        results: dict[str, dict[str, Any]] = {}
        rounds.append(results)
        for name in configs:
            print(f"round {i + 1}/{args.runs}: {name}", file=sys.stderr, flush=True)
            target = CONFIGS[name][1](ctx, stores)
            try:
                rp.wait_ready(target.server, target.port, 120)
                results[name] = {ph.name: load(args, ctx, target, ph) for ph in PHASES}
            finally:
                assert target.server is not None
                target.server.stop()
    return rounds, part2(args, ctx, stores, litellm)


def main() -> None:
    args = parse_args()
    configs = [c for c in args.configs.split(",") if c]
    litellm = "litellm-redis" in configs and rp.litellm_available() is None
    if "litellm-redis" in configs and not litellm:
        print(f"skipping LiteLLM: {rp.litellm_available()}", file=sys.stderr)
        configs.remove("litellm-redis")
    tmp = Path(tempfile.mkdtemp(prefix="tierwise-cache-bench-"))
    (tmp / "logs").mkdir()
    pg = start_postgres(tmp / "pg")
    started = time.monotonic()
    try:
        rounds, trace_rows = run(args, configs, litellm, tmp, pg)
    finally:
        rp.stop_all()
        pg.remove()
    print(render(rounds, configs, trace_rows, args))
    print(f"- wall time {time.monotonic() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"rounds": rounds, "trace": trace_rows}, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)


def _m(rounds: list[dict[str, dict[str, Any]]], name: str, get: Callable[[dict[str, Any]], float]) -> list[float]:
    return [get(r[name]) for r in rounds if name in r]


def render(rounds: list[dict[str, dict[str, Any]]], configs: list[str], trace: list[dict[str, Any]],
           args: argparse.Namespace) -> str:  # fmt: skip
    def cell(values: list[float], fmt: str, unit: str = "") -> str:
        if not values:
            return "n/a"
        text = format(median(values), fmt) + unit
        if len(values) == 1:
            return text
        return f"{text} [{format(min(values), fmt)}{unit} .. {format(max(values), fmt)}{unit}]"

    def cpu(r: dict[str, Any], phase: str) -> float:
        return float(r[phase]["cpu_ms_per_request"]["proxy"])

    rows = [
        ("latency p50 c=1 (ms)", lambda r: r["c1"]["latency_ms"]["p50"], ".2f"),
        ("latency p99 c=1 (ms)", lambda r: r["c1"]["latency_ms"]["p99"], ".2f"),
        ("proxy CPU/req c=1 (ms)", lambda r: cpu(r, "c1"), ".3f"),
        ("throughput c=32 (req/s)", lambda r: r["c32"]["rps"], ".0f"),
        ("proxy CPU/req c=32 (ms)", lambda r: cpu(r, "c32"), ".3f"),
    ]
    out = ["| metric | " + " | ".join(CONFIGS[c][0] for c in configs) + " |",
           "|---|" + "---|" * len(configs)]  # fmt: skip
    for title, get, fmt in rows:
        out.append(f"| {title} | " + " | ".join(cell(_m(rounds, c, get), fmt) for c in configs) + " |")
    if "minimal" in configs:
        for phase in ("c1", "c32"):
            ratios = []
            for c in configs:
                vals = [cpu(r[c], phase) / cpu(r["minimal"], phase) for r in rounds if c in r and "minimal" in r]
                ratios.append(cell(vals, ".2f", "x"))
            out.append(f"| proxy CPU/req vs minimal, {phase} | " + " | ".join(ratios) + " |")
    out += ["", f"Zipf trace: {args.trace_requests} requests over {args.trace_prompts} prompts, exponent {args.zipf}, "
            "seed 7, concurrency 8", "", "| configuration | hit ratio | best possible | ms per request | "
            "proxy CPU ms per request | RSS after (MiB) |", "|---|---|---|---|---|---|"]  # fmt: skip
    for t in trace:
        out.append(f"| {t['name']} | {t['hit_ratio']:.3f} | {t['best']:.3f} | {t['ms_per_request']:.2f} | "
                   f"{t['cpu_ms_per_request']:.3f} | {t['rss_mb']:.0f} |")  # fmt: skip
    out.append(f"\n- {args.runs} round(s), interleaved; each phase {args.warmup} s warm-up + {args.duration} s; "
               "values: median [min .. max] over rounds")  # fmt: skip
    return "\n".join(out)


if __name__ == "__main__":
    main()
