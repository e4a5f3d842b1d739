"""Admission under overload (issue 15): three tiers sharing one backend that is offered three times
what it can serve, with tierwise in front and with the minimal pass-through proxy in front, in one run.

One fake backend with a fixed capacity (`--capacity` requests in flight; past it a 429, or with
`--queue-at-capacity` a FIFO queue, as a model server at its batch size) answers in about 200 ms.
Three tiers send the same model to it, so they share one waiting room in tierwise: gold (priority
100, total p95 SLO 1.5 s, waits at most 1 s), silver (priority 0, waits at most 3 s, max_tokens
capped at 8 from 80 % load) and bronze (priority -1: sheddable, refused at once when the target
is saturated; max_tokens 4 from 50 %). An open-loop client sends the same seeded Poisson schedule
(20/30/50 gold/silver/bronze, `--load` times the backend's capacity in requests per second) to
each front in turn, giving up on a request after `--timeout` seconds.

Then the cost of the admit stage when nothing waits: a closed loop of 4 connections through each
front to a backend without a capacity limit (20 ms answers), the proxy's CPU seconds per request
read from /proc at both edges of the window (bench/loadgen.py), in interleaved rounds. The stage
cannot be turned off, so tierwise runs with one plain tier (nothing for admission to do but take
and give back a slot) and with the three tiers above (its degradation steps looked at per request).

    .venv/bin/python bench/run_overload.py                        # ~2 min; writes bench/results/
    .venv/bin/python bench/run_overload.py --queue-at-capacity --skip-cpu
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import overload_report as rep
import run_proxy as rp

RESULTS = rp.BENCH / "results"
GOLD_SLO_MS = 1500
MIX = (0.2, 0.3, 0.5)  # gold, silver, bronze
# (seconds since the load started, adaptive limit, slots in use, requests waiting), from /metrics
LimitSample = tuple[float, float, int, int]
BODY = json.dumps({"model": rp.MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16})


def tier(name: str, backend_url: str, spec: str) -> str:
    return f"""\
---
apiVersion: tierwise.dev/v1alpha1
kind: InferenceTier
metadata: {{name: {name}, namespace: bench}}
spec:
  backends:
    - {{name: main, model: {rp.MODEL}, url: "{backend_url}", pricing: {{inputPerMillion: 0.15, outputPerMillion: 0.6}}}}
{spec}"""


def overload_policy(backend_url: str) -> str:
    # Silver is the default tier so that run_proxy's readiness check (no tier header) gets an answer.
    return (
        tier(
            "gold",
            backend_url,
            f"  priority: 100\n  slo: {{totalP95Milliseconds: {GOLD_SLO_MS}}}\n"
            "  queue: {maxWaitMilliseconds: 1000}\n",
        )
        + tier(
            "silver",
            backend_url,
            "  priority: 0\n  queue: {maxWaitMilliseconds: 3000}\n"
            "  degradation: {steps: [{atLoadPercent: 80, maxTokens: 8}]}\n"
            "  access: {default: true}\n",
        )
        + tier("bronze", backend_url, "  priority: -1\n  degradation: {steps: [{atLoadPercent: 50, maxTokens: 4}]}\n")
    )


def plain_policy(backend_url: str) -> str:
    return tier("silver", backend_url, "  access: {default: true}\n")


def code_version() -> str:
    """HEAD, plus a digest of the sources when api/ or sidecar/ hold uncommitted changes: the servers
    run from the working tree, which may be work in progress (and change between two runs)."""

    def git(*argv: str) -> str:
        return subprocess.run(["git", "-C", str(rp.ROOT), *argv], capture_output=True, text=True, check=False).stdout

    head = git("rev-parse", "--short", "HEAD").strip()
    if not git("status", "--porcelain", "--", "api", "sidecar").strip():
        return head
    digest = hashlib.sha256()
    for path in sorted(p for root in ("api", "sidecar") for p in (rp.ROOT / root).rglob("*.py")):
        digest.update(path.read_bytes())
    return f"{head} + uncommitted changes {digest.hexdigest()[:10]}"


# ---------------------------------------------------------------------------------------- processes


def start_backend(args: argparse.Namespace, log_dir: Path, name: str, *, capacity: int | None,
                  first_byte_ms: float, per_token_ms: float) -> tuple[rp.Server, int]:  # fmt: skip
    port = rp.free_port()
    argv = [str(rp.PYTHON), "-m", "tierwise_sidecar.fake_backend", "--host", rp.HOST, "--port", str(port),
            "--first-byte-ms", str(first_byte_ms), "--per-token-ms", str(per_token_ms),
            "--completion-tokens", str(args.tokens)]  # fmt: skip
    if capacity is not None:
        argv += ["--capacity", str(capacity), "--queue-at-capacity", str(args.queue_at_capacity).lower()]
    server = rp.Server(name, argv, args.client_cpu, log_dir, rp.base_env())
    server.start()
    rp.wait_ready(server, port, 30)
    return server, port


def start_front(args: argparse.Namespace, ctx: rp.Context, kind: str, policy: str = "") -> rp.Target:
    """The minimal proxy (run_proxy's), or the gateway with `policy` written to a folder of its own."""
    if kind == "minimal":
        target = rp.start_minimal(ctx)
    else:
        folder = Path(tempfile.mkdtemp(prefix=f"policy-{kind}-", dir=ctx.tmp))
        (folder / "tiers.yaml").write_text(policy)
        port = rp.free_port()
        argv = [str(rp.TIERWISE), "gateway", "--policy", str(folder), "--namespace", "bench",
                "--host", rp.HOST, "--port", str(port)]  # fmt: skip
        server = rp.Server(kind, argv, ctx.cpu_proxy, ctx.log_dir, rp.base_env())
        server.start()
        target = rp.Target(port, server)
    rp.wait_ready(target.server, target.port, 60)
    return target


def fake_stats(port: int, reset: bool = False) -> dict[str, Any]:
    req = urllib.request.Request(f"http://{rp.HOST}:{port}/fake/stats", method="DELETE" if reset else "GET")
    with urllib.request.urlopen(req, timeout=5) as resp:
        return dict(json.loads(resp.read()))


# ---------------------------------------------------------------------------------------- open loop


def schedule(rate: float, duration: float, seed: int) -> list[tuple[float, str]]:
    """Poisson arrivals at `rate` per second, each with a tier drawn by MIX: the same for every front."""
    rng = random.Random(seed)
    out: list[tuple[float, str]] = []
    t = rng.expovariate(rate)
    while t < duration:
        out.append((t, rng.choices(rep.TIERS, weights=MIX)[0]))
        t += rng.expovariate(rate)
    return out


async def send(session: aiohttp.ClientSession, url: str, tier: str, at: float, t0: float) -> rep.Record:
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench", "x-tierwise-tier": tier}
    start = time.perf_counter()
    status, code, timed_out = 0, None, False
    retry_after = degraded = wait = None
    try:
        async with session.post(url, data=BODY, headers=headers) as resp:
            body = await resp.read()
            status, h = resp.status, resp.headers
            retry_after, degraded = h.get("Retry-After"), h.get("x-tierwise-degraded")
            wait = h.get("x-tierwise-queue-wait-ms")
            if status != 200:
                try:
                    code = json.loads(body)["error"]["code"]
                except (ValueError, KeyError, TypeError):
                    code = f"http_{status}"
    except TimeoutError:  # aiohttp's total timeout: the client gave up
        timed_out, code = True, "client_timeout"
    except aiohttp.ClientError as e:
        code = type(e).__name__
    latency = (time.perf_counter() - start) * 1000
    outcome = rep.classify(status, retry_after, degraded, timed_out)
    wait_ms = float(wait) if wait else None
    return rep.Record(tier, at, start - t0, latency, status, outcome, retry_after, degraded, code, wait_ms)


async def sample_limit(port: int, t0: float, out: list[LimitSample], stop: asyncio.Event) -> None:
    """tierwise's adaptive limit, slots in use and waiters (from its /metrics) twice a second."""
    names = ("tierwise_admission_limit{", "tierwise_admission_in_flight{", "tierwise_admission_waiting{")
    async with aiohttp.ClientSession() as s:
        while not stop.is_set():
            try:
                async with s.get(f"http://{rp.HOST}:{port}/metrics") as resp:
                    text = await resp.text()
                vals = {
                    n: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() for n in names if line.startswith(n)
                }
                if len(vals) == 3:
                    out.append((time.perf_counter() - t0, vals[names[0]], int(vals[names[1]]), int(vals[names[2]])))
            except (aiohttp.ClientError, ValueError, IndexError):
                pass
            await asyncio.sleep(0.5)


async def open_loop(
    port: int, plan: list[tuple[float, str]], timeout: float, limits: list[LimitSample] | None
) -> list[rep.Record]:
    """Sends each request when it is due, whether or not earlier ones have been answered."""
    url = f"http://{rp.HOST}:{port}/v1/chat/completions"
    # No connection limit: a pooled client capped at N connections would turn the open loop closed.
    conn = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        t0 = time.perf_counter() + 0.1
        stop = asyncio.Event()
        sampler = asyncio.ensure_future(sample_limit(port, t0, limits, stop)) if limits is not None else None
        tasks = []
        for at, tier in plan:
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(send(session, url, tier, at, t0)))
        records = list(await asyncio.gather(*tasks))
        stop.set()
        if sampler is not None:
            await sampler
    return records


def run_front(args: argparse.Namespace, ctx: rp.Context, kind: str, plan: list[tuple[float, str]]) -> dict[str, Any]:
    target = start_front(args, ctx, kind, overload_policy(ctx.backend_url))
    limits: list[LimitSample] | None = [] if kind == "tierwise" else None
    try:
        fake_stats(ctx.backend_port, reset=True)
        print(f"{kind}: {len(plan)} requests over {args.duration:g} s", flush=True)
        records = asyncio.run(open_loop(target.port, plan, args.timeout, limits))
        backend = fake_stats(ctx.backend_port)
    finally:
        assert target.server is not None
        target.server.stop()
    # A front that stopped with requests still queued in the backend (queue mode) must not pass them on.
    deadline = time.monotonic() + 15
    while fake_stats(ctx.backend_port)["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.2)
    lag = max((r.sent - r.at for r in records), default=0.0)
    return {"records": records, "backend": backend, "limits": limits or [], "max_send_lag_s": lag}


# ---------------------------------------------------------------------------------------- CPU per request


def cpu_window(args: argparse.Namespace, ctx: rp.Context, target: rp.Target, tier_name: str) -> dict[str, Any]:
    assert target.server is not None
    argv = ["taskset", "-c", args.client_cpu, str(rp.PYTHON), str(rp.BENCH / "loadgen.py"), "--port", str(target.port),
            "--concurrency", "4", "--duration", str(args.cpu_duration), "--warmup", "1",
            "--header", f"x-tierwise-tier: {tier_name}",
            "--cpu-pid", f"proxy={target.server.pid}", "--cpu-pid", f"backend={ctx.backend_pid}"]  # fmt: skip
    r = subprocess.run(argv, capture_output=True, text=True, timeout=args.cpu_duration + 60, check=False)
    if r.returncode != 0:
        raise rp.BenchError(f"load generator failed: {r.stderr[-1500:]}")
    return dict(json.loads(r.stdout))


CPU_CONFIGS = {  # name -> (front, policy maker, tier the requests name)
    "minimal": ("minimal", plain_policy, "silver"),
    "tierwise, one plain tier": ("tierwise-plain", plain_policy, "silver"),
    "tierwise, the three tiers (silver)": ("tierwise", overload_policy, "silver"),
}


def run_cpu(args: argparse.Namespace, tmp: Path, log_dir: Path) -> dict[str, list[dict[str, Any]]]:
    backend, port = start_backend(args, log_dir, "fake-backend-cpu", capacity=None, first_byte_ms=20, per_token_ms=0)
    url = f"http://{rp.HOST}:{port}/v1"
    ctx = rp.Context(url, backend.pid, port, args.proxy_cpu, log_dir, tmp)
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in CPU_CONFIGS}
    try:
        for i in range(args.cpu_rounds):  # interleaved: a slow minute elsewhere on the machine hits every config
            for name, (kind, policy, tier_name) in CPU_CONFIGS.items():
                target = start_front(args, ctx, kind, policy(url))
                try:
                    res = cpu_window(args, ctx, target, tier_name)
                finally:
                    assert target.server is not None
                    target.server.stop()
                cpu = res["cpu_ms_per_request"]["proxy"]
                print(
                    f"cpu round {i + 1}: {name}: {res['rps']:.0f} req/s, {cpu:.3f} ms CPU/req, "
                    f"statuses {res['statuses']}",
                    flush=True,
                )
                out[name].append(res)
    finally:
        backend.stop()
    return out


# ---------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--capacity", type=int, default=8, help="requests the backend serves at once")
    p.add_argument("--queue-at-capacity", action="store_true", help="the backend queues past capacity (no 429)")
    p.add_argument("--first-byte-ms", type=float, default=40.0)
    p.add_argument("--per-token-ms", type=float, default=10.0)
    p.add_argument("--tokens", type=int, default=16, help="completion tokens of a full answer")
    p.add_argument("--load", type=float, default=3.0, help="offered load, times the backend's capacity in req/s")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of offered load per front")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds a client waits before giving up")
    p.add_argument("--seed", type=int, default=15)
    p.add_argument("--cpu-rounds", type=int, default=2)
    p.add_argument("--cpu-duration", type=float, default=8.0, help="measured seconds per CPU window")
    p.add_argument("--skip-cpu", action="store_true")
    p.add_argument("--proxy-cpu", default="0", help="taskset CPU list for the front under test")
    p.add_argument("--client-cpu", default="1", help="CPU list for the fake backend and the load generator")
    p.add_argument("--json", type=Path, help="summary JSON (default: bench/results/overload[-queue].json)")
    p.add_argument("--plot", type=Path, help="PNG (default: bench/results/overload[-queue].png)")
    p.add_argument("--raw", type=Path, help="also write every request's record here (overload_report.py reads it)")
    args = p.parse_args(argv)
    stem = "overload-queue" if args.queue_at_capacity else "overload"
    args.json = args.json or RESULTS / f"{stem}.json"
    args.plot = args.plot or RESULTS / f"{stem}.png"
    return args


@dataclass
class Scenario:
    title: str
    capacity_rps: float
    rate: float
    plan: list[tuple[float, str]]


def scenario(args: argparse.Namespace) -> Scenario:
    base_s = (args.first_byte_ms + args.per_token_ms * args.tokens) / 1000
    capacity_rps = args.capacity / base_s
    rate = args.load * capacity_rps
    mode = "queues FIFO" if args.queue_at_capacity else "answers 429"
    title = (
        f"{args.capacity} slots x {base_s * 1000:.0f} ms = {capacity_rps:.0f} req/s capacity (past it the backend "
        f"{mode}); offered {rate:.0f} req/s, gold/silver/bronze 20/30/50 %"
    )
    return Scenario(title, capacity_rps, rate, schedule(rate, args.duration, args.seed))


def run(args: argparse.Namespace, sc: Scenario, tmp: Path) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Both fronts on the capacity-limited backend, then the CPU windows; every server stopped after."""
    log_dir = tmp / "logs"
    log_dir.mkdir()
    fronts: dict[str, dict[str, Any]] = {}
    cpu: dict[str, list[dict[str, Any]]] = {}
    try:
        backend, port = start_backend(args, log_dir, "fake-backend", capacity=args.capacity,
                                      first_byte_ms=args.first_byte_ms, per_token_ms=args.per_token_ms)  # fmt: skip
        ctx = rp.Context(f"http://{rp.HOST}:{port}/v1", backend.pid, port, args.proxy_cpu, log_dir, tmp)
        for kind in ("tierwise", "minimal"):
            fronts[kind] = run_front(args, ctx, kind, sc.plan)
        backend.stop()
        if not args.skip_cpu:
            cpu = run_cpu(args, tmp, log_dir)
    finally:
        rp.stop_all()
    return fronts, cpu


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(s, rp._on_signal)
    # The load generator beside the backend, as run_proxy places it: the front has a core to itself.
    os.sched_setaffinity(0, {int(c) for c in args.client_cpu.split(",")})
    sc = scenario(args)
    version = code_version()
    print(f"{sc.title}\ncode: {version}", flush=True)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="tierwise-overload-"))
    try:
        fronts, cpu = run(args, sc, tmp)
    except (KeyboardInterrupt, rp.BenchError) as e:
        print(f"stopped: {e}; server logs in {tmp / 'logs'}", file=sys.stderr)
        return 1
    shutil.rmtree(tmp, ignore_errors=True)
    if code_version() != version:
        print(
            f"WARNING: the sources changed during the run (now {code_version()}): the servers may have run other code"
        )
    rep.report(args, sc, fronts, cpu, version, slo_ms=GOLD_SLO_MS)
    print(f"wall time {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
