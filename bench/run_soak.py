"""Memory over a long run: the tierwise gateway with a budget in Redis, a million requests.

The fake backend and Redis run on one core, the gateway on the other; the load generator sends
chunks of requests at concurrency 32 (every other chunk streaming) and the gateway's resident
memory is read after each chunk, so a leak shows as a slope, not only as a final figure.

    .venv/bin/python bench/run_soak.py                       # 1,000,000 requests (~20 min)
    .venv/bin/python bench/run_soak.py --requests 100000     # a shorter look
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import procstat
from run_proxy import BENCH, HOST, PYTHON, TIERWISE, Server, base_env, free_port, tierwise_policy, wait_ready


def rss_mib(pid: int) -> tuple[float, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def start(args: argparse.Namespace, tmp: Path, servers: list[Server]) -> tuple[Server, int]:
    """The fake backend and Redis on CPU 1, the gateway on CPU 0; the gateway and its port."""
    bport = free_port()
    backend = Server("fake", [str(PYTHON), "-m", "tierwise_sidecar.fake_backend", "--host", HOST, "--port",
                              str(bport), "--completion-tokens", "16"], "1", tmp, base_env())  # fmt: skip
    backend.start()
    servers.append(backend)
    wait_ready(backend, bport, 30)
    store: list[str] = []
    if args.store == "redis":
        rport = free_port()
        redis = Server("redis", ["redis-server", "--bind", HOST, "--port", str(rport), "--dir", str(tmp),
                                 "--save", "", "--appendonly", "yes", "--appendfsync", "everysec"],
                       "1", tmp, base_env())  # fmt: skip
        redis.start()
        servers.append(redis)
        time.sleep(0.5)
        store = ["--budget-store", f"redis://{HOST}:{rport}/0"]
    elif args.store == "memory":
        store = ["--budget-store", "memory"]
    policy = tmp / "policy"
    policy.mkdir()
    (policy / "tiers.yaml").write_text(tierwise_policy(f"http://{HOST}:{bport}/v1", budget=args.store != "none"))
    gport = free_port()
    gw = Server("tierwise", [str(TIERWISE), "gateway", "--policy", str(policy), "--namespace", "bench", "--host",
                             HOST, "--port", str(gport), *store], "0", tmp, base_env())  # fmt: skip
    gw.start()
    servers.append(gw)
    wait_ready(gw, gport, 60)
    return gw, gport


def soak(args: argparse.Namespace, gw: Server, port: int) -> None:
    print("| requests | RSS (MiB) | peak RSS (MiB) | req/s last chunk | errors |", flush=True)
    print("|---|---|---|---|---|")
    rss, hwm = rss_mib(gw.pid)
    print(f"| 0 | {rss:.0f} | {hwm:.0f} | | |", flush=True)
    done = chunk = errors = 0
    started = time.monotonic()
    while done < args.requests:
        argv = ["taskset", "-c", "1", str(PYTHON), str(BENCH / "loadgen.py"), "--port", str(port),
                "--concurrency", "32", "--duration", str(args.chunk_seconds), "--warmup", "0.5"]  # fmt: skip
        if chunk % 2:
            argv.append("--stream")
        r = subprocess.run(argv, capture_output=True, text=True, timeout=args.chunk_seconds + 120, check=True)
        res = json.loads(r.stdout)
        done += int(res["requests"]) + int(res["errors"])
        errors += int(res["errors"])
        chunk += 1
        rss, hwm = rss_mib(gw.pid)
        print(f"| {done} | {rss:.0f} | {hwm:.0f} | {res['rps']:.0f} | {errors} |", flush=True)
    print(f"\n- store: {args.store}; {done} requests in {time.monotonic() - started:.0f} s at concurrency 32, "
          "every other chunk streaming; RSS of the gateway process (procfs VmRSS/VmHWM)")  # fmt: skip
    print(f"- gateway CPU: {procstat.tree_cpu_seconds(gw.pid):.0f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=1_000_000)
    p.add_argument("--chunk-seconds", type=float, default=60.0)
    p.add_argument("--store", choices=["redis", "memory", "none"], default="redis")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="tierwise-soak-"))
    servers: list[Server] = []
    try:
        gw, port = start(args, tmp, servers)
        soak(args, gw, port)
    finally:
        for s in reversed(servers):
            s.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
