"""Instructions per request, counted by valgrind's callgrind: the repeatable figure.

On two noisy cores CPU time per request moves by tens of percent between runs (BENCHMARKS.md shows
the spread); instructions executed do not. Each proxy runs under callgrind (about 50 times slower,
which does not matter to a count), answers a warm-up, then its counters are zeroed, it serves N
sequential requests on one keep-alive connection, and the count is dumped. The fake backend, the
client and Redis run natively and are not counted. With --concurrency C, C connections send their
share of the N requests at once: what requests in flight together share (a Redis round trip, a
collection of the young generation) is counted as under load, still as a repeatable figure.

    .venv/bin/python bench/run_instructions.py                           # minimal, tierwise, budgets
    .venv/bin/python bench/run_instructions.py --before fa67371          # and another revision's gateway
    .venv/bin/python bench/run_instructions.py --concurrency 32 --requests 3200 --whole \
        --configs minimal,redis --before fa67371                         # under load, budgets in Redis
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
import threading
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

CONFIGS = ("minimal", "tierwise", "memory", "sqlite", "redis", "before", "before-redis")
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


def send_all(conns: list[http.client.HTTPConnection], n: int, stream: bool) -> None:
    """`n` requests shared by the connections, each sending its share back to back; all at once."""
    if len(conns) == 1:
        for _ in range(n):
            post(conns[0], stream)
        return
    errors: list[BaseException] = []

    def share(conn: http.client.HTTPConnection, k: int) -> None:
        try:
            for _ in range(k):
                post(conn, stream)
        except BaseException as e:  # reported by the caller, not lost in a thread
            errors.append(e)

    threads = [threading.Thread(target=share, args=(c, n // len(conns) + (i < n % len(conns))))
               for i, c in enumerate(conns)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=3600)
    if errors:
        raise RuntimeError(f"{len(errors)} connection(s) failed; first: {errors[0]!r}")


def count(pid: int, port: int, n: int, stream: bool, out_prefix: Path, *, concurrency: int = 1) -> float:
    """Instructions per request over `n` requests, counters zeroed before and dumped after."""
    conns = [http.client.HTTPConnection(HOST, port, timeout=600) for _ in range(concurrency)]
    send_all(conns, max(20, 2 * concurrency), stream)
    subprocess.run(["callgrind_control", "-z", str(pid)], capture_output=True, check=True, timeout=120)
    send_all(conns, n, stream)
    before = set(out_prefix.parent.glob(out_prefix.name + "*"))
    subprocess.run(["callgrind_control", "-d", str(pid)], capture_output=True, check=True, timeout=120)
    for conn in conns:
        conn.close()
    dumps = sorted(set(out_prefix.parent.glob(out_prefix.name + "*")) - before, key=os.path.getmtime)
    for line in dumps[-1].read_text().splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1]) / n
    raise RuntimeError(f"no summary in {dumps[-1]}")


def measure(
    name: str, argv: list[str], env: dict[str, str], tmp: Path, n: int, *, concurrency: int, stream: bool
) -> tuple[float, float | None]:
    port = free_port()
    out = tmp / f"cg-{name}"
    vg = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p", "--dump-instr=no"]
    server = Server(name, [*vg, *argv, "--port", str(port)], "0", tmp, env)
    server.start()
    try:
        ready(port, 400)
        whole = count(server.pid, port, n, False, out, concurrency=concurrency)
        return whole, count(server.pid, port, n, True, out, concurrency=concurrency) if stream else None
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--before", metavar="REF", help="also count another revision's gateway")
    p.add_argument("--concurrency", type=int, default=1, help="connections sending the requests at once")
    p.add_argument("--whole", action="store_true", help="whole answers only (no streamed figure)")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"comma-separated subset of {','.join(CONFIGS)} (before: with --before)")  # fmt: skip
    args = p.parse_args(argv)
    wanted = set(args.configs.split(","))
    if unknown := wanted - set(CONFIGS):
        p.error(f"unknown configurations: {', '.join(sorted(unknown))}")
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
        configs = build_configs(args, wanted, tmp, url, f"redis://{HOST}:{rport}/0")
        rows = []
        for name, (cmd, env) in configs.items():
            print(f"counting {name} ...", file=sys.stderr, flush=True)
            slug = name.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "and")
            whole, stream = measure(slug, cmd, env, tmp, args.requests, concurrency=args.concurrency,
                                    stream=not args.whole)  # fmt: skip
            rows.append((name, whole, stream))
        print(table(rows))
        version = subprocess.run(["valgrind", "--version"], capture_output=True, text=True, check=False).stdout
        how = (
            "sequential requests per figure after 20 warm-up, one keep-alive connection"
            if args.concurrency == 1
            else f"requests per figure on {args.concurrency} keep-alive connections at once, after a warm-up"
        )
        print(f"\n- {version.strip()}; {args.requests} {how}; a 16-token chat completion"
              f"{'' if args.whole else ' (stream: the same, streamed)'}")  # fmt: skip
    finally:
        for s in reversed(servers):
            s.stop()
        remove_checkout(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def build_configs(
    args: argparse.Namespace, wanted: set[str], tmp: Path, url: str, redis_url: str
) -> dict[str, tuple[list[str], dict[str, str]]]:
    """The command and environment of each proxy to count, by its name in the table."""
    configs: dict[str, tuple[list[str], dict[str, str]]] = {}
    if "minimal" in wanted:
        configs["minimal aiohttp"] = (
            [str(PYTHON), str(BENCH / "minimal_proxy.py"), "--upstream", url, "--host", HOST, "--uvloop"],
            base_env(),
        )
    if args.before and wanted & {"before", "before-redis"}:
        tree = checkout(args.before, tmp)
        roots = [str(tree / r) for r in ("cli", "api", "sidecar", "operator") if (tree / r).is_dir()]
        module = "tierwise_cli" if (tree / "cli" / "tierwise_cli").is_dir() else "tierwise.cli"
        env = base_env(PYTHONPATH=os.pathsep.join(roots))
        if "before" in wanted:
            configs[f"tierwise at {args.before}"] = (
                [str(PYTHON), "-m", module, *gateway_args(tmp, "before", url, False)],
                env,
            )
        if "before-redis" in wanted:
            configs[f"tierwise at {args.before} + budget (Redis)"] = (
                [str(PYTHON), "-m", module, *gateway_args(tmp, "before-redis", url, True), "--budget-store",
                 redis_url], env,
            )  # fmt: skip
    for key, name, store in (("tierwise", "tierwise", None),
                             ("memory", "tierwise + budget (in memory)", "memory"),
                             ("sqlite", "tierwise + budget (SQLite)", f"sqlite:{tmp / 'l.sqlite'}"),
                             ("redis", "tierwise + budget (Redis)", redis_url)):  # fmt: skip
        if key not in wanted:
            continue
        extra = ["--budget-store", store] if store else []
        configs[name] = ([str(TIERWISE), *gateway_args(tmp, name, url, store is not None), *extra], base_env())
    return configs


def table(rows: list[tuple[str, float, float | None]]) -> str:
    """Each proxy's count, and its ratio to the minimal proxy's when that was counted."""
    base = next((r for r in rows if r[0] == "minimal aiohttp"), None)

    def cell(v: float | None, b: float | None) -> str:
        if v is None:
            return "— | —"
        return f"{v / 1e6:.3f} M | " + (f"{v / b:.2f}x" if b else "—")

    lines = [
        "| proxy | instructions per request | ratio to minimal | stream: per request | ratio |",
        "|---|---|---|---|---|",
    ]
    for name, whole, stream in rows:
        lines.append(
            f"| {name} | {cell(whole, base[1] if base else None)} | {cell(stream, base[2] if base else None)} |"
        )
    return "\n".join(lines)


def gateway_args(tmp: Path, name: str, url: str, budget: bool) -> list[str]:
    policy = tmp / f"policy-{name.replace(' ', '_').replace('(', '').replace(')', '')}"
    policy.mkdir(exist_ok=True)
    (policy / "tiers.yaml").write_text(tierwise_policy(url, budget=budget))
    return ["gateway", "--policy", str(policy), "--namespace", "bench", "--host", HOST]


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "bench"))
    sys.exit(main())
