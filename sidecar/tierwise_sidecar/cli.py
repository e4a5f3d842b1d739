"""`tierwise sidecar`, `tierwise gateway` and `tierwise estimate`."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tierwise.compiler import DEFAULT_PLATFORM_NAMESPACE
from tierwise_sidecar import estimate, identify, route, validate
from tierwise_sidecar.app import Gateway, Source
from tierwise_sidecar.config import ForwardConfig, GatewayConfig
from tierwise_sidecar.difficulty import difficulty_of
from tierwise_sidecar.estimate import estimate_on
from tierwise_sidecar.exchange import BufferSink, Exchange
from tierwise_sidecar.ingress import Ingress, IngressSource, parse_target, parse_upstream
from tierwise_sidecar.pipeline import Chain
from tierwise_sidecar.policy_source import CrFolder, PolicyFile, PolicyLoadError
from tierwise_sidecar.runtime import HEALTH, Runtime, build_runtime, self_hosted_keys
from tierwise_sidecar.secrets import DEFAULT_DIR, SecretSource
from tierwise_sidecar.serve import run
from tierwise_sidecar.state import SharedState, StartupError
from tierwise_sidecar.tokens import TOKENS
from tierwise_sidecar.validate import Kind, Limits

DEFAULT_POLICY_FILE = Path("/etc/tierwise/policy/policy.json")
T = TypeVar("T")


def _serve_args(p: argparse.ArgumentParser, host_help: str) -> None:
    p.add_argument("--host", help=f"address to listen on (default {host_help})")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    p.add_argument(
        "--health-port",
        type=int,
        help="also serve /healthz, /readyz and /metrics on this port, on every interface (for probes and scrapes; "
        "$TIERWISE_HEALTH_HOST narrows it)",
    )
    p.add_argument(
        "--secrets-dir",
        type=Path,
        default=DEFAULT_DIR,
        help=f"mounted Secrets, <dir>/<name>/<key> (default {DEFAULT_DIR})",
    )
    p.add_argument("--max-body-bytes", type=int, default=Limits.max_body_bytes, help="largest request body accepted")
    p.add_argument("--drain-seconds", type=float, default=30.0, help="how long SIGTERM waits for in-flight requests")
    p.add_argument("--reload-interval", type=float, default=1.0, help="seconds between checks for a changed Policy")
    p.add_argument("--log-level", default=os.environ.get("TIERWISE_LOG_LEVEL", "INFO"))


def _budget_store_arg(p: argparse.ArgumentParser, default: str, where: str) -> None:
    p.add_argument(
        "--budget-store",
        default=os.environ.get("TIERWISE_REDIS_URL") or os.environ.get("TIERWISE_BUDGET_STORE") or default,
        help="where budgets are counted: a redis:// or rediss:// URL (shared by every sidecar), sqlite:PATH "
        f"(this process alone) or memory. Default: $TIERWISE_REDIS_URL, else $TIERWISE_BUDGET_STORE, else {where}. "
        "Pass a URL with a password through the environment, not the command line",
    )
    p.add_argument(
        "--rate-limit-store",
        default=os.environ.get("TIERWISE_REDIS_URL") or "memory",
        help="where rate limits shared by a tenant or namespace are counted: a redis:// or rediss:// URL (every "
        "sidecar shares each limit) or memory (each process alone). Default: $TIERWISE_REDIS_URL, else memory",
    )
    p.add_argument(
        "--budget-lease-margin",
        type=float,
        default=30.0,
        help="seconds a budget reservation outlives its request's deadline: how long the holds of a sidecar "
        "that died keep budget from the others (default 30)",
    )


def _beside_policy(args: argparse.Namespace, option: str, name: str) -> Path | None:
    """`tierwise sidecar` reads what the operator publishes beside the Policy it mounts."""
    if getattr(args, "policy_file", None) is None:
        return None
    explicit: Path | None = getattr(args, option)
    return explicit if explicit is not None else args.policy_file.parent / name


def _state_home() -> Path:
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "tierwise"


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _serve(
    args: argparse.Namespace, source: Source, dns_interval: float | None, wait: bool, ingress: bool = False
) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = GatewayConfig(
        limits=Limits(max_body_bytes=args.max_body_bytes),
        # An ingress passes its replica's failure back at once: the caller's sidecar retries and
        # fails over itself, and two layers of retries would multiply the load on a sick replica.
        forward=ForwardConfig(retries=0) if ingress else ForwardConfig(),
        reload_interval=args.reload_interval,
        drain_seconds=args.drain_seconds,
        dns_interval=dns_interval,
        pin_tier=ingress,
        budget_store=args.budget_store,
        rate_limit_store=args.rate_limit_store,
        lease_margin_seconds=args.budget_lease_margin,
        published_budgets=_beside_policy(args, "budget_state_file", "budgets.json"),
        steering_file=_beside_policy(args, "steering_file", "steering.json"),
    )
    # The app's own sidecar is for the pod alone; an ingress is reached by Services on the pod IP,
    # so it listens on every interface ("": IPv4 and IPv6).
    host = args.host if args.host is not None else ("" if ingress else "127.0.0.1")
    gateway = Gateway(source, config, SecretSource(args.secrets_dir))
    gateway.reload()
    if gateway.runtime is None and not wait:
        print("error: no usable Policy; see the log above", file=sys.stderr)
        return 1
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        try:
            runner.run(run(gateway, host, args.port, health_port=args.health_port))
        except StartupError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0


def _cmd_gateway(args: argparse.Namespace) -> int:
    source = CrFolder(args.policy, args.namespace, args.platform_namespace, args.endpoints)
    return _serve(args, source, None, wait=False)


def _cmd_sidecar(args: argparse.Namespace) -> int:
    source = PolicyFile(args.policy_file, args.namespace)
    if args.ingress is not None:
        return _cmd_ingress(args, source)
    if args.upstream is not None:
        print("error: --upstream is only valid with --ingress", file=sys.stderr)
        return 2
    in_cluster = "KUBERNETES_SERVICE_HOST" in os.environ
    dns = args.dns_interval if (args.discover_endpoints or (args.discover_endpoints is None and in_cluster)) else None
    return _serve(args, source, dns, wait=True)


def _cmd_ingress(args: argparse.Namespace, source: PolicyFile) -> int:
    """The front door of one self-hosted replica: one tier, one backend, one upstream."""
    if args.upstream is None:
        print("error: --ingress needs --upstream, the model server's base URL", file=sys.stderr)
        return 2
    if args.discover_endpoints:
        print("error: --ingress serves only its --upstream; it discovers no endpoints", file=sys.stderr)
        return 2
    tier, backend = args.ingress
    return _serve(args, IngressSource(source, Ingress(tier, backend, args.upstream)), None, wait=True, ingress=True)


def _arg_type(parse: Callable[[str], T]) -> Callable[[str], T]:
    """A parser raising ValueError, as an argparse type whose message reaches the user."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


def _policy_of(path: Path, namespace: str | None, platform: str) -> Any:
    if path.is_file():
        try:
            return PolicyFile(path).load().policy
        except PolicyLoadError:
            pass  # not a compiled Policy: a file of CRs
    return CrFolder(path, namespace, platform).load().policy


def _estimate_chain(runtime: Runtime, state: SharedState) -> Chain:
    """The stages a request passes before any backend is called, exactly as the sidecar builds them."""
    stages = (validate.build, identify.build, estimate.build, route.build)
    return Chain([s for s in (b(runtime, state) for b in stages) if s is not None])


def _cmd_estimate(args: argparse.Namespace) -> int:
    try:
        policy = _policy_of(args.policy, args.namespace, args.platform_namespace)
        raw = Path(args.request).read_bytes() if args.request != "-" else sys.stdin.buffer.read()
    except (PolicyLoadError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    runtime = build_runtime(policy, SecretSource(Path("/nonexistent"), {}), calls=False)
    state = SharedState(GatewayConfig())
    # Routing as if every replica of a self-hosted backend were up: there is no cluster to ask.
    state.get(HEALTH).endpoints.replace({key: ("http://self-hosted.invalid",) for key in self_hosted_keys(policy)})
    kind: Kind = args.kind
    headers = {"x-tierwise-tier": args.tier} if args.tier else {}
    headers["x-tierwise-priority"] = args.priority
    x = Exchange.arriving(kind, raw, headers, runtime, sink=BufferSink(), started=time.monotonic())
    asyncio.run(_estimate_chain(runtime, state).run(x))
    if x.error is not None:
        print(f"error: {x.error.message}", file=sys.stderr)
        return 1
    tier = runtime.tiers[x.identity.tier]
    rows = [
        {"backend": b.name, "model": b.model, "inputTokens": est.input_tokens,
         "maxOutputTokens": est.output_tokens, "maxCostUsd": round(est.usd, 8)}
        for b in tier.backends
        for est in (estimate_on(x, b, state.get(TOKENS)),)
    ]  # fmt: skip
    decision = x.decision
    out = {
        "namespace": runtime.namespace,
        "tier": tier.name,
        "strategy": str(tier.strategy),
        # Scored whether or not the tier routes by it, to show what cost-aware routing would see.
        "score": x.score if x.score is not None else difficulty_of(kind, x.body, x.input_tokens, x.identity.priority),
        "decision": decision.decision if decision else None,
        "routedTo": decision.order[0].name if decision and decision.order else None,
        "backends": rows,
    }
    if args.output == "json":
        print(json.dumps(out, indent=2))
    else:
        print(yaml.safe_dump(out, sort_keys=False), end="")
    return 0


def add_commands(sub: Any) -> None:
    g = sub.add_parser("gateway", help="serve the OpenAI API standalone, from a folder of tier/budget/cache YAML")
    g.add_argument("--policy", type=Path, required=True, help="folder (or file) of InferenceTier/... YAML")
    g.add_argument("-n", "--namespace", help="namespace to serve as (default: the one the files use)")
    g.add_argument("--platform-namespace", default=DEFAULT_PLATFORM_NAMESPACE)
    g.add_argument("--endpoints", type=Path, help="YAML of tier/backend: [base URLs] for self-hosted backends")
    _serve_args(g, "127.0.0.1")
    ledger = _state_home() / "budgets.sqlite"
    _budget_store_arg(g, f"sqlite:{ledger}", f"sqlite:{ledger} (spend survives a restart)")
    g.set_defaults(func=_cmd_gateway)

    s = sub.add_parser("sidecar", help="serve the OpenAI API in a pod, from the Policy the operator mounts")
    s.add_argument(
        "--policy-file", type=Path, default=Path(os.environ.get("TIERWISE_POLICY_FILE", DEFAULT_POLICY_FILE))
    )
    s.add_argument(
        "--discover-endpoints",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="resolve self-hosted replicas from headless Services (default: when in a cluster)",
    )
    s.add_argument("--dns-interval", type=float, default=10.0, help="seconds between endpoint lookups")
    s.add_argument("-n", "--namespace", help="namespace the sidecar runs in: a Policy compiled for another is refused")
    s.add_argument(
        "--ingress",
        metavar="TIER/BACKEND",
        type=_arg_type(parse_target),
        help="serve as the front door of one replica of this self-hosted backend (set by the operator)",
    )
    s.add_argument(
        "--upstream",
        metavar="URL",
        type=_arg_type(parse_upstream),
        help="with --ingress: base URL of the model server in the same pod, e.g. http://127.0.0.1:8000/v1",
    )
    _serve_args(s, "127.0.0.1; with --ingress every interface")
    _budget_store_arg(s, "memory", "memory")
    s.add_argument(
        "--budget-state-file",
        type=Path,
        help="the budgets' spend across every sidecar, as the operator publishes it (default: budgets.json beside "
        "--policy-file); counted when budgets are not in Redis",
    )
    s.add_argument(
        "--steering-file",
        type=Path,
        help="the operator's SLO steering of the tiers (default: steering.json beside --policy-file)",
    )
    s.set_defaults(func=_cmd_sidecar)

    e = sub.add_parser("estimate", help="print the token and cost estimate of a request under a Policy")
    e.add_argument("request", help="JSON request body (a file, or - for standard input)")
    e.add_argument("--policy", type=Path, required=True, help="compiled Policy file, or folder/file of CR YAML")
    e.add_argument("-n", "--namespace")
    e.add_argument("--platform-namespace", default=DEFAULT_PLATFORM_NAMESPACE)
    e.add_argument("--kind", choices=["chat", "completions", "embeddings"], default="chat")
    e.add_argument(
        "--tier", help="tier to estimate on (default: the request's model if it names a tier, else the default tier)"
    )
    e.add_argument("--priority", choices=["low", "normal", "high"], default="normal")
    e.add_argument("-o", "--output", choices=["yaml", "json"], default="yaml")
    e.set_defaults(func=_cmd_estimate)

    from tierwise_sidecar.replay.command import add_command as add_replay

    add_replay(sub)
