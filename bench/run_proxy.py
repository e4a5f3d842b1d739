"""Side-by-side proxy benchmark: direct vs a minimal aiohttp proxy vs LiteLLM vs the tierwise gateway
(its full pipeline without budgets, with a budget on the SQLite ledger and with a budget in Redis,
and optionally the gateway of another git revision, for a before/after comparison in one run).

Every configuration talks to the same fake OpenAI-compatible backend (zero latency, 16 completion
tokens). Rounds are interleaved (round 1 runs every configuration, then round 2, ...) and each
proxy is started fresh for each round. The proxy under test is pinned to one core; the fake
backend and the load generator share the other. See bench/README.md.

    .venv/bin/python bench/run_proxy.py                    # 3 rounds, 5 s windows
    .venv/bin/python bench/run_proxy.py --quick            # smoke run, about a minute
    .venv/bin/python bench/run_proxy.py --json out.json --configs direct,minimal
    .venv/bin/python bench/run_proxy.py --offline          # inside a network namespace with only loopback
    .venv/bin/python bench/run_proxy.py --before fa67371 --configs minimal,before,tierwise
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import http.client
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import procstat

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PYTHON = ROOT / ".venv" / "bin" / "python"
TIERWISE = ROOT / ".venv" / "bin" / "tierwise"
LITELLM_VENV = Path(os.environ.get("TIERWISE_LITELLM_VENV", Path.home() / ".cache/tierwise/bench-litellm-venv"))
MODEL = "gpt-4o-mini"
CONFIGS = ("direct", "minimal", "litellm", "tierwise", "tierwise-sqlite", "tierwise-redis", "before", "before-redis")
DEFAULT_CONFIGS = ("direct", "minimal", "litellm", "tierwise", "tierwise-sqlite", "tierwise-redis")
HOST = "127.0.0.1"


@dataclass(frozen=True)
class Phase:
    name: str
    concurrency: int
    stream: bool


PHASES = (
    Phase("c1", 1, False),
    Phase("c32", 32, False),
    Phase("c128", 128, False),
    Phase("stream_c1", 1, True),
)


class BenchError(Exception):
    pass


# ---------------------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it if this harness dies without cleaning up (even SIGKILL)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Server:
    name: str
    argv: list[str]
    cpu: str
    log_dir: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.log_dir / f"{self.name}.log"

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            # A session of its own: Ctrl-C in the terminal does not reach it, stop() ends its whole group.
            self.proc = subprocess.Popen(
                ["taskset", "-c", self.cpu, *self.argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 (the harness runs no threads)
            )
        RUNNING.append(self)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid  # taskset execs the program: same pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None:
            return
        procstat.stop_group(self.proc, grace=10)
        # Workers that outlived their parent still carry its process group id.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self in RUNNING:
            RUNNING.remove(self)


RUNNING: list[Server] = []


def stop_all() -> None:
    for s in list(reversed(RUNNING)):
        s.stop()


def _on_signal(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# ---------------------------------------------------------------------------------------- HTTP checks


def chat_request(port: int, stream: bool, timeout: float) -> tuple[int, str]:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 16}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=json.dumps(body),
            headers={"Content-Type": "application/json", "Authorization": "Bearer sk-bench"},
        )
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


def wait_ready(server: Server | None, port: int, timeout: float) -> float:
    """Polls with a real chat request until it answers 200; returns seconds waited."""
    start = time.monotonic()
    last = ""
    while time.monotonic() - start < timeout:
        if server is not None and not server.alive():
            raise BenchError(f"{server.name} exited during start-up; log tail:\n{server.log_tail()}")
        try:
            status, body = chat_request(port, stream=False, timeout=5)
            if status == 200:
                return time.monotonic() - start
            last = f"HTTP {status}: {body[:300]}"
        except OSError as e:
            last = f"{type(e).__name__}: {e}"
        time.sleep(0.2)
    tail = f"\nlog tail:\n{server.log_tail()}" if server else ""
    raise BenchError(f"not ready after {timeout:.0f} s (last: {last}){tail}")


def sanity_check(port: int) -> None:
    """A whole answer and a whole stream, both well formed, before anything is measured."""
    status, body = chat_request(port, stream=False, timeout=10)
    if status != 200:
        raise BenchError(f"non-stream request: HTTP {status}: {body[:300]}")
    data = json.loads(body)
    if not data.get("choices") or not data["choices"][0].get("message", {}).get("content"):
        raise BenchError(f"non-stream answer has no content: {body[:300]}")
    status, body = chat_request(port, stream=True, timeout=10)
    events = [line[6:] for line in body.splitlines() if line.startswith("data: ")]
    if status != 200 or not events or events[-1].strip() != "[DONE]":
        raise BenchError(f"stream request: HTTP {status}, body does not end with [DONE]: {body[-300:]}")
    text = "".join(
        (c.get("delta") or {}).get("content") or "" for e in events[:-1] for c in json.loads(e).get("choices", [])
    )
    if not text:
        raise BenchError(f"stream carried no content: {body[:300]}")


# ---------------------------------------------------------------------------------------- configurations


@dataclass
class Context:
    backend_url: str
    backend_pid: int
    backend_port: int
    cpu_proxy: str
    log_dir: Path
    tmp: Path
    redis_url: str | None = None
    redis_pid: int | None = None
    before: Path | None = None


@dataclass
class Target:
    port: int
    server: Server | None  # None: direct to the backend


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.update(extra)
    return env


def start_minimal(ctx: Context) -> Target:
    port = free_port()
    argv = [str(PYTHON), str(BENCH / "minimal_proxy.py"), "--upstream", ctx.backend_url, "--host", HOST]
    if importlib.util.find_spec("uvloop") is not None:
        # The same event loop as the tierwise sidecar (which runs on uvloop when installed).
        argv.append("--uvloop")
    server = Server("minimal", [*argv, "--port", str(port)], ctx.cpu_proxy, ctx.log_dir, base_env())
    server.start()
    return Target(port, server)


LITELLM_ENV = {
    # The model cost map otherwise comes from raw.githubusercontent.com at import time.
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_LOG": "ERROR",
    "LITELLM_TELEMETRY": "False",
    "LITELLM_MODE": "PRODUCTION",  # do not load a .env file from the working directory
    "DISABLE_SCHEMA_UPDATE": "True",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


def litellm_config(backend_url: str) -> str:
    # JSON is YAML; written out this way it needs no YAML library here.
    config = {
        "model_list": [
            {
                "model_name": MODEL,
                "litellm_params": {"model": f"openai/{MODEL}", "api_base": backend_url, "api_key": "dummy"},
            }
        ],
        "litellm_settings": {
            "telemetry": False,
            "turn_off_message_logging": True,
            "drop_params": True,
            "set_verbose": False,
            "success_callback": [],
            "failure_callback": [],
            "callbacks": [],
            "request_timeout": 60,
        },
        "general_settings": {"disable_spend_logs": True, "disable_error_logs": True},
    }
    return json.dumps(config, indent=2) + "\n"


# uvicorn writes an INFO access-log line per request unless told otherwise; LITELLM_LOG only covers
# LiteLLM's own loggers. Passed with --log_config.
UVICORN_LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}},
    "loggers": {
        "uvicorn": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
        "uvicorn.error": {"level": "WARNING"},
        "uvicorn.access": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
    },
}


def litellm_available() -> str | None:
    if not (LITELLM_VENV / "bin" / "litellm").exists():
        return f"no LiteLLM venv at {LITELLM_VENV}: run bench/setup_litellm.sh"
    return None


def start_litellm(ctx: Context) -> Target:
    port = free_port()
    config = ctx.tmp / "litellm.yaml"
    config.write_text(litellm_config(ctx.backend_url))
    log_config = ctx.tmp / "litellm-uvicorn-log.json"
    log_config.write_text(json.dumps(UVICORN_LOG_CONFIG))
    env = base_env(**LITELLM_ENV)
    for k in ("DATABASE_URL", "LITELLM_MASTER_KEY", "REDIS_HOST", "REDIS_URL"):
        env.pop(k, None)
    argv = [str(LITELLM_VENV / "bin" / "litellm"), "--config", str(config), "--log_config", str(log_config)]
    argv += ["--host", HOST, "--port", str(port), "--num_workers", "1"]
    server = Server("litellm", argv, ctx.cpu_proxy, ctx.log_dir, env)
    server.start()
    return Target(port, server)


def tierwise_policy(backend_url: str, budget: bool = False) -> str:
    # A budget every request counts against and none reaches: the cost of reserving and settling.
    counted = (
        """
---
apiVersion: tierwise.dev/v1alpha1
kind: CostBudget
metadata: {name: bench, namespace: bench}
spec:
  limit: {usd: 1000000000}
  thresholds: [{percent: 80, action: Notify}, {percent: 100, action: Reject}]
"""
        if budget
        else ""
    )
    return (
        f"""\
# Generated by bench/run_proxy.py for each run: both backends are the same fake provider.
apiVersion: tierwise.dev/v1alpha1
kind: InferenceTier
metadata: {{name: standard, namespace: bench}}
spec:
  backends:
    - name: cheap
      model: gpt-4o-mini
      url: {backend_url}
      pricing: {{inputPerMillion: 0.15, outputPerMillion: 0.6}}
      capabilities: {{maxContextTokens: 128000, strength: 40}}
    - name: strong
      model: gpt-4o
      url: {backend_url}
      pricing: {{inputPerMillion: 2.5, outputPerMillion: 10}}
      capabilities: {{maxContextTokens: 128000, strength: 90}}
  routing:
    strategy: CostAware
  access:
    defaultFor: {{names: [bench]}}
"""
        + counted
    )


def tierwise_available() -> str | None:
    if not TIERWISE.exists():
        return f"{TIERWISE} not found: install the project (pip install -e .)"
    try:
        r = subprocess.run([str(TIERWISE), "gateway", "--help"], capture_output=True, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        return "`tierwise gateway --help` timed out"
    if r.returncode != 0:
        return "`tierwise gateway` does not exist yet in this checkout (skipped; it runs once the command exists)"
    return None


def _gateway(ctx: Context, name: str, store: str | None, command: list[str], env: dict[str, str]) -> Target:
    policy = ctx.tmp / f"policy-{name}"
    policy.mkdir(exist_ok=True)
    (policy / "tiers.yaml").write_text(tierwise_policy(ctx.backend_url, budget=store is not None))
    port = free_port()
    argv = [*command, "gateway", "--policy", str(policy), "--namespace", "bench", "--host", HOST, "--port", str(port)]
    if store is not None:
        argv += ["--budget-store", store]
    server = Server(name, argv, ctx.cpu_proxy, ctx.log_dir, env)
    server.start()
    return Target(port, server)


def start_tierwise(ctx: Context) -> Target:
    return _gateway(ctx, "tierwise", None, [str(TIERWISE)], base_env())


def start_tierwise_sqlite(ctx: Context) -> Target:
    ledger = ctx.tmp / f"ledger-{time.monotonic_ns()}.sqlite"
    return _gateway(ctx, "tierwise-sqlite", f"sqlite:{ledger}", [str(TIERWISE)], base_env())


def start_tierwise_redis(ctx: Context) -> Target:
    if ctx.redis_url is None:
        raise BenchError("no Redis for this configuration")
    return _gateway(ctx, "tierwise-redis", ctx.redis_url, [str(TIERWISE)], base_env())


def _before_command(ctx: Context) -> tuple[list[str], dict[str, str]]:
    """The gateway of another revision (a git worktree), on this venv's dependencies."""
    tree = ctx.before
    if tree is None:
        raise BenchError("--before REF is needed for this configuration")
    roots = [str(tree / r) for r in ("cli", "api", "sidecar", "operator") if (tree / r).is_dir()]
    module = "tierwise_cli" if (tree / "cli" / "tierwise_cli").is_dir() else "tierwise.cli"
    return [str(PYTHON), "-m", module], base_env(PYTHONPATH=os.pathsep.join(roots))


def start_before(ctx: Context) -> Target:
    return _gateway(ctx, "before", None, *_before_command(ctx))


def start_before_redis(ctx: Context) -> Target:
    if ctx.redis_url is None:
        raise BenchError("no Redis for this configuration")
    return _gateway(ctx, "before-redis", ctx.redis_url, *_before_command(ctx))


def redis_available() -> str | None:
    return None if shutil.which("redis-server") else "redis-server is not installed (hack/setup.sh installs it)"


def before_available() -> str | None:
    return None if BEFORE_REF else "needs --before REF"


BEFORE_REF: list[str] = []


@dataclass(frozen=True)
class Config:
    name: str
    title: str
    start: Callable[[Context], Target] | None
    available: Callable[[], str | None]
    startup_timeout: float


CONFIG_DEFS = {
    "direct": Config("direct", "direct", None, lambda: None, 0),
    "minimal": Config("minimal", "minimal aiohttp", start_minimal, lambda: None, 30),
    "litellm": Config("litellm", "LiteLLM", start_litellm, litellm_available, 120),
    "tierwise": Config("tierwise", "tierwise", start_tierwise, tierwise_available, 60),
    "tierwise-sqlite": Config(
        "tierwise-sqlite", "tierwise + budget (SQLite)", start_tierwise_sqlite, tierwise_available, 60
    ),
    "tierwise-redis": Config(
        "tierwise-redis",
        "tierwise + budget (Redis)",
        start_tierwise_redis,
        lambda: tierwise_available() or redis_available(),
        60,
    ),
    "before": Config("before", "tierwise before", start_before, before_available, 60),
    "before-redis": Config(
        "before-redis",
        "tierwise before + budget (Redis)",
        start_before_redis,
        lambda: before_available() or redis_available(),
        60,
    ),
}


# ---------------------------------------------------------------------------------------- measuring


def run_phase(args: argparse.Namespace, ctx: Context, target: Target, phase: Phase) -> dict[str, Any]:
    argv = [
        "taskset",
        "-c",
        args.client_cpu,
        str(PYTHON),
        str(BENCH / "loadgen.py"),
        "--port",
        str(target.port),
        "--model",
        MODEL,
        "--concurrency",
        str(phase.concurrency),
        "--duration",
        str(args.duration),
        "--warmup",
        str(args.warmup),
        "--cpu-pid",
        f"backend={ctx.backend_pid}",
    ]
    if target.server is not None:
        argv += ["--cpu-pid", f"proxy={target.server.pid}"]
    counted = target.server is not None and target.server.name in ("tierwise-redis", "before-redis")
    if ctx.redis_pid is not None and counted:
        argv += ["--cpu-pid", f"redis={ctx.redis_pid}"]
    if phase.stream:
        argv.append("--stream")
    limit = args.warmup + args.duration + 10 + 30
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=limit, check=False)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"load generator did not finish within {limit:.0f} s") from e
    if r.returncode != 0:
        raise BenchError(f"load generator failed ({r.returncode}): {r.stderr[-1500:]}")
    return dict(json.loads(r.stdout))


def run_wrk(args: argparse.Namespace, port: int, concurrency: int) -> float | None:
    script = BENCH / "wrk_post.lua"
    argv = [
        "taskset",
        "-c",
        args.client_cpu,
        "wrk",
        "-t1",
        f"-c{concurrency}",
        f"-d{args.duration:g}s",
        "-s",
        str(script),
    ]
    argv.append(f"http://{HOST}:{port}/v1/chat/completions")
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=args.duration + 30, check=False)
    except subprocess.TimeoutExpired:
        return None
    for line in r.stdout.splitlines():
        if line.startswith("Requests/sec:"):
            return float(line.split()[1])
    return None


def run_config(args: argparse.Namespace, ctx: Context, cfg: Config) -> dict[str, Any]:
    out: dict[str, Any] = {"phases": {}}
    target = Target(ctx.backend_port, None) if cfg.start is None else cfg.start(ctx)
    try:
        out["startup_s"] = wait_ready(target.server, target.port, cfg.startup_timeout) if target.server else None
        sanity_check(target.port)
        for phase in PHASES:
            if phase.name not in args.phases:
                continue
            time.sleep(args.settle)
            res = run_phase(args, ctx, target, phase)
            out["phases"][phase.name] = res
            lat = res["ttfb_ms"] if phase.stream else res["latency_ms"]
            cpu = res["cpu_ms_per_request"].get("proxy")
            print(
                f"    {phase.name:<10} {res['rps']:8.0f} req/s  p50 {lat.get('p50', float('nan')):7.2f} ms"
                f"  p99 {lat.get('p99', float('nan')):7.2f} ms"
                + (f"  proxy {cpu:.3f} ms CPU/req" if cpu is not None else "")
                + (f"  ERRORS {res['errors']} {res['error_samples'][:1]} {res['statuses']}" if res["errors"] else ""),
                flush=True,
            )
        cpu = [p["cpu_s"] for p in out["phases"].values()]
        out["other_load"] = sum(c["other"] for c in cpu) / sum(p["elapsed_s"] for p in out["phases"].values())
        out["steal"] = sum(c["system_steal"] for c in cpu)
        if args.wrk:
            out["wrk_rps_c32"] = run_wrk(args, target.port, 32)
        if target.server is not None:
            out["rss_mb"] = procstat.tree_rss_bytes(target.server.pid) / 2**20
            out["processes"] = len(procstat.tree(target.server.pid))
    finally:
        if target.server is not None:
            target.server.stop()
    return out


# ---------------------------------------------------------------------------------------- summary

Getter = Callable[[dict[str, Any]], float | None]


def _phase(name: str, *keys: str) -> Getter:
    def get(run: dict[str, Any]) -> float | None:
        v: Any = run.get("phases", {}).get(name)
        for k in keys:
            if not isinstance(v, dict) or v.get(k) is None:
                return None
            v = v[k]
        return float(v)

    return get


def _key(k: str) -> Getter:
    return lambda run: None if run.get(k) is None else float(run[k])


# key, row label, value of one configuration in one round, format
METRICS: list[tuple[str, str, Getter, str]] = [
    ("rps_c32", "throughput c=32 (req/s)", _phase("c32", "rps"), "{:.0f}"),
    ("rps_c128", "throughput c=128 (req/s)", _phase("c128", "rps"), "{:.0f}"),
    ("p50_c1", "latency p50 c=1 (ms)", _phase("c1", "latency_ms", "p50"), "{:.2f}"),
    ("p99_c1", "latency p99 c=1 (ms)", _phase("c1", "latency_ms", "p99"), "{:.2f}"),
    ("p50_c32", "latency p50 c=32 (ms)", _phase("c32", "latency_ms", "p50"), "{:.2f}"),
    ("p99_c32", "latency p99 c=32 (ms)", _phase("c32", "latency_ms", "p99"), "{:.2f}"),
    ("ttfb_c1", "stream TTFB p50 c=1 (ms)", _phase("stream_c1", "ttfb_ms", "p50"), "{:.2f}"),
    ("cpu_c1", "proxy CPU/req c=1 (ms)", _phase("c1", "cpu_ms_per_request", "proxy"), "{:.3f}"),
    ("cpu_c32", "proxy CPU/req c=32 (ms)", _phase("c32", "cpu_ms_per_request", "proxy"), "{:.3f}"),
    ("cpu_c128", "proxy CPU/req c=128 (ms)", _phase("c128", "cpu_ms_per_request", "proxy"), "{:.3f}"),
    ("cpu_stream", "proxy CPU/req stream c=1 (ms)", _phase("stream_c1", "cpu_ms_per_request", "proxy"), "{:.3f}"),
    ("backend_cpu_c32", "backend CPU/req c=32 (ms)", _phase("c32", "cpu_ms_per_request", "backend"), "{:.3f}"),
    ("redis_cpu_c32", "Redis CPU/req c=32 (ms)", _phase("c32", "cpu_ms_per_request", "redis"), "{:.3f}"),
    ("rss_mb", "proxy RSS after run (MiB)", _key("rss_mb"), "{:.0f}"),
    ("wrk_c32", "wrk throughput c=32 (req/s)", _key("wrk_rps_c32"), "{:.0f}"),
    ("other_load", "other CPU load while measuring (cores)", _key("other_load"), "{:.2f}"),
    ("startup_s", "proxy start-up (s)", _key("startup_s"), "{:.1f}"),
]
ADDED = [("p50_c1", "added p50 c=1 (ms)"), ("p99_c1", "added p99 c=1 (ms)"), ("p50_c32", "added p50 c=32 (ms)")]
ADDED += [("p99_c32", "added p99 c=32 (ms)"), ("ttfb_c1", "added stream TTFB p50 c=1 (ms)")]


def per_round(rounds: list[dict[str, Any]], config: str, getter: Getter) -> list[float | None]:
    return [getter(r[config]) if config in r else None for r in rounds]


def summarize(rounds: list[dict[str, Any]], configs: list[str]) -> dict[str, dict[str, list[float]]]:
    """metric -> config -> the per-round values (rounds where the metric is missing left out)."""
    out: dict[str, dict[str, list[float]]] = {}
    values: dict[str, dict[str, list[float | None]]] = {}
    for key, _label, getter, _fmt in METRICS:
        values[key] = {c: per_round(rounds, c, getter) for c in configs}
        out[key] = {c: [v for v in vs if v is not None] for c, vs in values[key].items()}

    def diff(a: list[float | None], b: list[float | None]) -> list[float]:
        return [x - y for x, y in zip(a, b, strict=True) if x is not None and y is not None]

    def ratio(a: list[float | None], b: list[float | None]) -> list[float]:
        return [x / y for x, y in zip(a, b, strict=True) if x is not None and y]

    added: dict[str, dict[str, list[float | None]]] = {}
    if "direct" in configs:
        for key, _label in ADDED:
            added[key] = {}
            direct = values[key]["direct"]
            for c in configs:
                pairs = zip(values[key][c], direct, strict=True)
                added[key][c] = [None if x is None or y is None else x - y for x, y in pairs]
            out["added_" + key] = {c: [v for v in vs if v is not None] for c, vs in added[key].items()}
    if "minimal" in configs:
        base = "minimal"
        for key in ("rps_c32", "rps_c128"):
            out["ratio_" + key] = {c: ratio(values[key][c], values[key][base]) for c in configs}
        for key in ("cpu_c32", "cpu_c128", "cpu_stream", "rss_mb"):
            out["ratio_" + key] = {c: ratio(values[key][c], values[key][base]) for c in configs if c != "direct"}
        for key, _label in ADDED:
            if key in added:
                out["vsmin_added_" + key] = {c: diff(added[key][c], added[key][base]) for c in configs if c != "direct"}
    return out


def cell(values: list[float], fmt: str, runs: int) -> str:
    if not values:
        return "n/a"
    med = fmt.format(statistics.median(values))
    if len(values) == 1:
        return med + ("" if runs == 1 else " (1 run)")
    return f"{med} [{fmt.format(min(values))} .. {fmt.format(max(values))}]"


def render(summary: dict[str, dict[str, list[float]]], configs: list[str], runs: int) -> str:
    titles = [CONFIG_DEFS[c].title for c in configs]
    lines = ["| metric | " + " | ".join(titles) + " |", "|---|" + "---|" * len(configs)]

    def row(label: str, key: str, fmt: str) -> None:
        vals = summary.get(key, {})
        if not any(vals.values()):
            return
        lines.append(f"| {label} | " + " | ".join(cell(vals.get(c, []), fmt, runs) for c in configs) + " |")

    for key, label, _g, fmt in METRICS:
        row(label, key, fmt)
    for key, label in ADDED:
        row(label, "added_" + key, "{:+.2f}")
    if "minimal" in configs:
        lines += ["", "Relative to the minimal aiohttp proxy (per-round ratios/differences, median [min .. max]):", ""]
        lines += ["| metric | " + " | ".join(titles) + " |", "|---|" + "---|" * len(configs)]
        row("throughput ratio c=32", "ratio_rps_c32", "{:.2f}x")
        row("throughput ratio c=128", "ratio_rps_c128", "{:.2f}x")
        for key, label in ADDED:
            row(label.replace("added", "added beyond minimal's:"), "vsmin_added_" + key, "{:+.2f}")
        row("proxy CPU/req ratio c=32", "ratio_cpu_c32", "{:.2f}x")
        row("proxy CPU/req ratio c=128", "ratio_cpu_c128", "{:.2f}x")
        row("proxy CPU/req ratio stream", "ratio_cpu_stream", "{:.2f}x")
        row("RSS ratio", "ratio_rss_mb", "{:.2f}x")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- environment


def _version_in(python: Path, *dists: str) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json, platform\n"
        "out = {'python': platform.python_version()}\n"
        f"for d in {list(dists)!r}:\n"
        "    try: out[d] = m.version(d)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))"
    )
    try:
        r = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60, check=True)
        return dict(json.loads(r.stdout))
    except (OSError, subprocess.SubprocessError, ValueError):
        return {}


def environment(args: argparse.Namespace) -> dict[str, Any]:
    env: dict[str, Any] = {
        "cpu": procstat.cpu_model(),
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "project": _version_in(PYTHON, "aiohttp", "uvloop", "tiktoken"),
        "placement": (
            f"proxy under test on CPU {args.proxy_cpu}; fake backend and load generator on CPU {args.client_cpu}"
        ),
        "offline_netns": bool(os.environ.get("TIERWISE_BENCH_NETNS")),
    }
    if (LITELLM_VENV / "bin" / "python").exists():
        env["litellm_venv"] = _version_in(
            LITELLM_VENV / "bin" / "python", "litellm", "fastapi", "uvicorn", "uvloop", "httpx", "aiohttp"
        )
    return env


def render_env(env: dict[str, Any], args: argparse.Namespace, loop: str) -> str:
    proj = env["project"]
    lines = [
        f"- CPU: {env['cpu']} ({env['cores']} cores), Linux {env['kernel']}",
        f"- placement: {env['placement']} (taskset)",
        f"- project venv: Python {proj.get('python')}, aiohttp {proj.get('aiohttp')}; load generator loop: {loop}"
        "; minimal proxy and tierwise: uvloop (when installed); fake backend: asyncio's default loop",
    ]
    ll = env.get("litellm_venv")
    if ll:
        lines.append(
            f"- LiteLLM venv: litellm {ll.get('litellm')}, Python {ll.get('python')}, fastapi {ll.get('fastapi')}, "
            f"uvicorn {ll.get('uvicorn')}, uvloop {ll.get('uvloop', 'absent')}; 1 worker"
        )
    lines.append(
        f"- {args.runs} round(s), interleaved; each phase: {args.warmup:g} s warm-up + {args.duration:g} s measured; "
        "non-stream c=1/32/128 and stream c=1; chat completion of 16 tokens; values: median [min .. max] over rounds"
    )
    if env.get("offline_netns"):
        lines.append("- ran inside a fresh network namespace with only loopback (--offline)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="rounds; each round runs every configuration once")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per phase")
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds before each measured window")
    p.add_argument("--settle", type=float, default=0.5, help="pause between phases")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round, 1 s windows, 0.3 s warm-up")
    p.add_argument(
        "--configs", default=",".join(DEFAULT_CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)}"
    )
    p.add_argument("--before", metavar="REF", help="git revision whose gateway runs as the configuration `before`")
    p.add_argument("--json", type=Path, help="write every raw result and the summary here")
    p.add_argument("--proxy-cpu", default="0", help="taskset CPU list for the proxy under test")
    p.add_argument("--client-cpu", default="1", help="taskset CPU list for the fake backend and the load generator")
    p.add_argument(
        "--phases",
        default=",".join(ph.name for ph in PHASES),
        help="comma-separated subset of the phases to run (e.g. c32 alone, for CPU per request under load)",
    )
    p.add_argument("--wrk", action="store_true", help="cross-check c=32 throughput with wrk (if installed)")
    p.add_argument("--offline", action="store_true", help="re-run inside a new network namespace with only loopback")
    p.add_argument("--keep-logs", action="store_true", help="keep server logs (always kept after a failure)")
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.duration, args.warmup, args.settle = 1, 1.0, 0.3, 0.2
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    args.phases = [ph.strip() for ph in args.phases.split(",") if ph.strip()]
    if set(args.phases) - {ph.name for ph in PHASES}:
        p.error(f"unknown phases: {', '.join(sorted(set(args.phases) - {ph.name for ph in PHASES}))}")
    if args.before:
        BEFORE_REF.append(args.before)
        if not {"before", "before-redis"} & set(args.configs):
            args.configs.append("before")
    unknown = set(args.configs) - set(CONFIGS)
    if unknown:
        p.error(f"unknown configurations: {', '.join(sorted(unknown))}")
    if args.wrk and not shutil.which("wrk"):
        p.error("--wrk: wrk is not installed")
    return args


def reexec_offline() -> None:
    """Runs this script again in a new network namespace whose only interface is loopback."""
    unshare = ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-rn"]
    script = 'ip link set lo up && exec "$@"'
    env = os.environ | {"TIERWISE_BENCH_NETNS": "1"}
    os.execvpe(unshare[0], [*unshare, "sh", "-c", script, "sh", sys.executable, *sys.argv], env)


def available_configs(names: list[str]) -> tuple[list[str], dict[str, str]]:
    configs: list[str] = []
    skipped: dict[str, str] = {}
    for name in names:
        why = CONFIG_DEFS[name].available()
        if why:
            skipped[name] = why
            print(f"skipping {name}: {why}", flush=True)
        else:
            configs.append(name)
    return configs, skipped


@dataclass
class Outcome:
    rounds: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    interrupted: bool = False


def run_rounds(args: argparse.Namespace, configs: list[str], tmp: Path) -> Outcome:
    """Starts the fake backend once, then runs every round; all servers are gone when it returns."""
    outcome = Outcome()
    log_dir = tmp / "logs"
    log_dir.mkdir()
    port = free_port()
    argv = [str(PYTHON), "-m", "tierwise_sidecar.fake_backend", "--host", HOST, "--port", str(port)]
    backend = Server("fake-backend", [*argv, "--completion-tokens", "16"], args.client_cpu, log_dir, base_env())
    try:
        backend.start()
        wait_ready(backend, port, 30)
        ctx = Context(f"http://{HOST}:{port}/v1", backend.pid, port, args.proxy_cpu, log_dir, tmp)
        if {"tierwise-redis", "before-redis"} & set(configs):
            ctx.redis_url, ctx.redis_pid = start_redis_server(args, tmp, log_dir)
        if {"before", "before-redis"} & set(configs):
            ctx.before = checkout(BEFORE_REF[0], tmp)
        for i in range(args.runs):
            results: dict[str, Any] = {}
            outcome.rounds.append(results)
            for name in configs:
                print(f"round {i + 1}/{args.runs}: {name}", flush=True)
                try:
                    results[name] = run_config(args, ctx, CONFIG_DEFS[name])
                except BenchError as e:
                    outcome.failures.append(f"round {i + 1} {name}: {e}")
                    print(f"  FAILED: {e}", flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted; stopping servers", file=sys.stderr)
        outcome.interrupted = True
    except BenchError as e:
        outcome.failures.append(f"fake backend: {e}")
    finally:
        stop_all()
    return outcome


def start_redis_server(args: argparse.Namespace, tmp: Path, log_dir: Path) -> tuple[str, int]:
    """A Redis for the budget configuration, beside the backend (the client CPU), with its
    append-only file fsynced every second (docs/budgets.md: what that bounds, and `always`)."""
    port = free_port()
    argv = ["redis-server", "--bind", HOST, "--port", str(port), "--dir", str(tmp), "--save", "",
            "--appendonly", "yes", "--appendfsync", "everysec"]  # fmt: skip
    server = Server("redis", argv, args.client_cpu, log_dir, base_env())
    server.start()
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection((HOST, port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    break
        except OSError:
            pass
        if time.monotonic() > deadline or not server.alive():
            raise BenchError(f"redis-server did not start: {server.log_tail()}")
        time.sleep(0.05)
    return f"redis://{HOST}:{port}/0", server.pid


def checkout(ref: str, tmp: Path) -> Path:
    """A detached worktree of `ref`: its sources run on this checkout's virtual environment."""
    tree = tmp / "before"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), ref], check=True,
                   capture_output=True, timeout=120)  # fmt: skip
    return tree


def remove_checkout(tmp: Path) -> None:
    if (tmp / "before").exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / "before")],
                       check=False, capture_output=True, timeout=120)  # fmt: skip


def report(args: argparse.Namespace, configs: list[str], skipped: dict[str, str], outcome: Outcome) -> str:
    rounds = outcome.rounds
    loops = {p.get("loop") for r in rounds for c in r.values() for p in c.get("phases", {}).values()}
    ran = [c for c in configs if any(c in r for r in rounds)]
    summary = summarize(rounds, ran)
    lines = [
        "",
        render(summary, ran, args.runs),
        "",
        render_env(ENV, args, "/".join(sorted(x for x in loops if x)) or "n/a"),
    ]
    lines += [f"- not run: {name}: {why}" for name, why in skipped.items()]
    lines += [f"- FAILED: {f}" for f in outcome.failures]
    if outcome.interrupted:
        lines.append("- INTERRUPTED: partial results")
    for i, r in enumerate(rounds):
        for c, res in r.items():
            for p, ph in res["phases"].items():
                if ph["errors"]:
                    lines.append(
                        f"- errors: round {i + 1} {c} {p}: {ph['errors']} {ph['statuses']} {ph['error_samples']}"
                    )
    if args.json:
        doc = {"env": ENV, "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
        doc |= {"skipped": skipped, "failures": outcome.failures, "rounds": rounds, "summary": summary}
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        lines.append(f"- raw results: {args.json}")
    return "\n".join(lines)


ENV: dict[str, Any] = {}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.offline and not os.environ.get("TIERWISE_BENCH_NETNS"):
        reexec_offline()
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    configs, skipped = available_configs(args.configs)
    if not configs:
        print("nothing to run", file=sys.stderr)
        return 2
    ENV.update(environment(args))
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="tierwise-bench-"))
    try:
        outcome = run_rounds(args, configs, tmp)
    finally:
        remove_checkout(tmp)
    if outcome.failures or outcome.interrupted or args.keep_logs:
        print(f"server logs kept in {tmp / 'logs'}", file=sys.stderr)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    print(report(args, configs, skipped, outcome))
    print(f"- wall time {time.monotonic() - started:.0f} s")
    if outcome.interrupted:
        return 130
    return 1 if outcome.failures else 0


if __name__ == "__main__":
    sys.exit(main())
