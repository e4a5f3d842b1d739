"""The `tierwise` command: `compile` here, the data path's commands from the sidecar, `operator` and
`webhook` from the operator (when its dependencies are installed)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from tierwise.compiler import DEFAULT_PLATFORM_NAMESPACE, CompileError, build_world, check, compile_world
from tierwise.loader import load


def _cmd_compile(args: argparse.Namespace) -> int:
    loaded = load(Path("<stdin>"), sys.stdin.read()) if args.path == "-" else load(Path(args.path))
    resources = loaded.resources
    world = build_world(resources, loaded.namespaces, args.platform_namespace)
    problems = loaded.problems + loaded.locate(check(world, resources))
    if problems:
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        print(f"{len(problems)} problem(s); nothing compiled", file=sys.stderr)
        return 1
    if not resources:
        print(f"error: no tierwise resources found in {args.path}", file=sys.stderr)
        return 1
    if args.namespace:
        targets = [args.namespace]
    else:
        found = world.namespaces()
        targets = [n for n in found if n != args.platform_namespace] or found
    policies = [compile_world(world, ns).wire() for ns in targets]
    if args.output == "json":
        out = policies[0] if len(policies) == 1 else {"apiVersion": "v1", "kind": "List", "items": policies}
        print(json.dumps(out, indent=2))
    else:
        print(yaml.safe_dump_all(policies, sort_keys=False), end="")
    return 0


# The modules a sidecar-only install lacks (`pip install tierwise` without the `operator` extra).
OPERATOR_DEPENDENCIES = frozenset({"kopf", "kubernetes_asyncio", "prometheus_api_client", "cryptography"})
OPERATOR_MISSING = (
    "the operator's dependencies are not installed: pip install 'tierwise[operator]' or use the operator image"
)


def _operator_missing(args: argparse.Namespace) -> int:
    print(f"error: {OPERATOR_MISSING}", file=sys.stderr)
    return 2


def _missing(module: str) -> bool:
    """Is a dependency not installed? Asked without importing it."""
    if module in sys.modules:
        return sys.modules[module] is None
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


def _add_operator_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`tierwise operator` and `tierwise webhook`. The sidecar image leaves their dependencies out;
    there both commands are still listed, and running them says what to install. Nothing of the
    operator is imported unless one of them runs."""
    commands = {
        "operator": "run the operator: reconcile tiers into Deployments, Services, scaling, Policies",
        "webhook": "serve the sidecar-injection admission webhook over TLS",
    }
    if any(_missing(name) for name in sorted(OPERATOR_DEPENDENCIES)):
        for name, help_text in commands.items():
            p = sub.add_parser(name, help=f"{help_text} (needs tierwise[operator])", add_help=False)
            p.set_defaults(func=_operator_missing)
        return
    from tierwise_operator import commands as operator_commands

    for name, add, main in (
        ("operator", operator_commands.operator_arguments, operator_commands.operator_main),
        ("webhook", operator_commands.webhook_arguments, operator_commands.webhook_main),
    ):
        p = sub.add_parser(name, help=commands[name])
        add(p)
        p.set_defaults(func=main)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tierwise", description="Cost and service-level control of LLM traffic.")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser(
        "compile", help="print the Policy a folder of InferenceTier/CostBudget/CachePolicy YAML compiles to"
    )
    c.add_argument("path", help="a YAML file, a folder of them (searched recursively), or - for standard input")
    c.add_argument("-n", "--namespace", help="namespace to compile for (default: every namespace in the files)")
    c.add_argument(
        "--platform-namespace",
        default=DEFAULT_PLATFORM_NAMESPACE,
        help=f"namespace whose objects may govern others (default {DEFAULT_PLATFORM_NAMESPACE})",
    )
    c.add_argument("-o", "--output", choices=["yaml", "json"], default="yaml")
    c.set_defaults(func=_cmd_compile)
    # The data path's commands live with the sidecar; imported here so `tierwise` is one command.
    from tierwise_sidecar.cli import add_commands

    add_commands(sub)
    _add_operator_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # parse_args, except that a command whose dependencies are missing takes any arguments: it only
    # says what to install.
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.func is not _operator_missing:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return int(args.func(args))
    except CompileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
