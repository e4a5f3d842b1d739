"""Instructions per request, counted by valgrind's callgrind: the repeatable figure.

On two noisy cores CPU time per request moves by tens of percent between runs (BENCHMARKS.md shows
the spread); instructions executed do not. Each proxy runs under callgrind (about 50 times slower,
which does not matter to a count), answers a warm-up, then its counters are zeroed, it serves N
sequential requests on one keep-alive connection, and the count is dumped. The fake backend, the
client and Redis run natively and are not counted.

    .venv/bin/python bench/run_instructions.py                           # minimal, tierwise, budgets
    .venv/bin/python bench/run_instructions.py --before fa67371          # and another revision's gateway
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run_proxy import (
    BENCH,
    HOST,
    PYTHON,
    ROOT,
    TIERWISE,
    Server,
    base_env,
    checkout,
    free_port,
    remove_checkout,
    tierwise_policy,
)

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 16}


def post(conn: http.client.HTTPConnection, stream: bool) -> None:
    body = {**BODY, "stream": True} if stream else BODY
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")


def ready(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection(HOST, port, timeout=60)
            post(conn, False)
            conn.close()
            return
        except (OSError, RuntimeError):
            time.sleep(1)
    raise RuntimeError(f"not ready after {timeout:.0f} s")


def count(pid: int, port: int, n: int, stream: bool, out_prefix: Path) -> float:
    """Instructions per request over `n` requests, counters zeroed before and dumped after."""
    conn = http.client.HTTPConnection(HOST, port, timeout=120)
    for _ in range(20):
        post(conn, stream)
    subprocess.run(["callgrind_control", "-z", str(pid)], capture_output=True, check=True, timeout=120)
    for _ in range(n):
        post(conn, stream)
    before = set(out_prefix.parent.glob(out_prefix.name + "*"))
    subprocess.run(["callgrind_control", "-d", str(pid)], capture_output=True, check=True, timeout=120)
    conn.close()
    dumps = sorted(set(out_prefix.parent.glob(out_prefix.name + "*")) - before, key=os.path.getmtime)
    for line in dumps[-1].read_text().splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1]) / n
    raise RuntimeError(f"no summary in {dumps[-1]}")


def measure(name: str, argv: list[str], env: dict[str, str], tmp: Path, n: int) -> tuple[float, float]:
    port = free_port()
    out = tmp / f"cg-{name}"
    vg = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p", "--dump-instr=no"]
    server = Server(name, [*vg, *argv, "--port", str(port)], "0", tmp, env)
    server.start()
    try:
        ready(port, 400)
        return count(server.pid, port, n, False, out), count(server.pid, port, n, True, out)
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--before", metavar="REF", help="also count another revision's gateway")
    args = p.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind (callgrind) is not installed", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="tierwise-instr-"))
    servers: list[Server] = []
    try:
        bport = free_port()
        backend = Server("fake", [str(PYTHON), "-m", "tierwise_sidecar.fake_backend", "--host", HOST, "--port",
                                  str(bport), "--completion-tokens", "16"], "1", tmp, base_env())  # fmt: skip
        backend.start()
        servers.append(backend)
        ready(bport, 30)
        rport = free_port()
        redis_argv = ["redis-server", "--bind", HOST, "--port", str(rport), "--dir", str(tmp), "--save", "",
                      "--appendonly", "yes", "--appendfsync", "everysec"]  # fmt: skip
        redis = Server("redis", redis_argv, "1", tmp, base_env())
        redis.start()
        servers.append(redis)
        url = f"http://{HOST}:{bport}/v1"
        configs: dict[str, tuple[list[str], dict[str, str]]] = {
            "minimal aiohttp": (
                [str(PYTHON), str(BENCH / "minimal_proxy.py"), "--upstream", url, "--host", HOST, "--uvloop"],
                base_env(),
            )
        }
        if args.before:
            tree = checkout(args.before, tmp)
            roots = [str(tree / r) for r in ("cli", "api", "sidecar", "operator") if (tree / r).is_dir()]
            module = "tierwise_cli" if (tree / "cli" / "tierwise_cli").is_dir() else "tierwise.cli"
            configs[f"tierwise at {args.before}"] = (
                [str(PYTHON), "-m", module, *gateway_args(tmp, "before", url, False)],
                base_env(PYTHONPATH=os.pathsep.join(roots)),
            )
        for name, store in (("tierwise", None), ("tierwise + budget (SQLite)", f"sqlite:{tmp / 'l.sqlite'}"),
                            ("tierwise + budget (Redis)", f"redis://{HOST}:{rport}/0")):  # fmt: skip
            extra = ["--budget-store", store] if store else []
            configs[name] = ([str(TIERWISE), *gateway_args(tmp, name, url, store is not None), *extra], base_env())
        rows = []
        for name, (cmd, env) in configs.items():
            print(f"counting {name} ...", file=sys.stderr, flush=True)
            rows.append((name, *measure(name.replace(" ", "_"), cmd, env, tmp, args.requests)))
        base = rows[0]
        print("| proxy | instructions per request | ratio to minimal | stream: per request | ratio |")
        print("|---|---|---|---|---|")
        for name, whole, stream in rows:
            print(f"| {name} | {whole / 1e6:.2f} M | {whole / base[1]:.2f}x | {stream / 1e6:.2f} M | "
                  f"{stream / base[2]:.2f}x |")  # fmt: skip
        version = subprocess.run(["valgrind", "--version"], capture_output=True, text=True, check=False).stdout
        print(f"\n- {version.strip()}; {args.requests} sequential requests per figure after 20 warm-up, one "
              "keep-alive connection; a 16-token chat completion (stream: the same, streamed)")  # fmt: skip
    finally:
        for s in reversed(servers):
            s.stop()
        remove_checkout(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def gateway_args(tmp: Path, name: str, url: str, budget: bool) -> list[str]:
    policy = tmp / f"policy-{name.replace(' ', '_').replace('(', '').replace(')', '')}"
    policy.mkdir(exist_ok=True)
    (policy / "tiers.yaml").write_text(tierwise_policy(url, budget=budget))
    return ["gateway", "--policy", str(policy), "--namespace", "bench", "--host", HOST]


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "bench"))
    sys.exit(main())
