"""What a replay is given as its Policy: objects from Git, a compiled Policy, or a live one.

A folder (or file) of InferenceTier/CostBudget/CachePolicy YAML is compiled as `tierwise gateway`
does. A compiled Policy (`tierwise compile`) is read as is. The namespace's Policy ConfigMap as the
cluster holds it (`kubectl get configmap tierwise-policy -n NS -o yaml`, a file or stdin) is the
live Policy: with it come what the operator publishes beside it, each budget's spend so far across
the sidecars and the SLO steering of the tiers, so the replay starts where the namespace stands —
a dry run of the trace against the live Policy, with fake providers, nothing sent anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import IO

import yaml

from tierwise.naming import BUDGETS_KEY, STEERING_KEY
from tierwise.policy import Policy
from tierwise_sidecar.policy_source import CrFolder, PolicyLoadError, policy_of

COMPILED_KINDS = frozenset({"Policy", "ConfigMap"})


@dataclass(frozen=True, slots=True)
class PolicyInput:
    policy: Policy
    described: str  # what it is, for the report: "examples/quickstart (objects)", ...
    # As the operator publishes them beside the Policy (JSON text): None when absent.
    budgets: str | None = None
    steering: str | None = None

    @property
    def live(self) -> bool:
        return self.budgets is not None or self.steering is not None


def from_document(data: object, where: str) -> PolicyInput:
    """A compiled Policy, or the ConfigMap holding one with what is published beside it."""
    policy = policy_of(data, where)
    if not (isinstance(data, dict) and data.get("kind") == "ConfigMap"):
        return PolicyInput(policy, f"{where} (compiled Policy {policy.hash[:19]})")
    meta = data.get("metadata") or {}
    name = f"{meta.get('namespace', policy.namespace)}/{meta.get('name', '?')}"
    beside = data.get("data") or {}
    budgets, steering = beside.get(BUDGETS_KEY), beside.get(STEERING_KEY)
    return PolicyInput(
        policy,
        f"ConfigMap {name} (live Policy {policy.hash[:19]}"
        + (", with the budgets' spend" if budgets else "")
        + (", with the SLO steering" if steering else "")
        + ")",
        budgets if isinstance(budgets, str) else None,
        steering if isinstance(steering, str) else None,
    )


def load_input(arg: str, namespace: str | None, platform: str, stdin: IO[str]) -> PolicyInput:
    """`--policy ARG`: `-` reads a compiled Policy or ConfigMap from stdin; a file whose first
    document is one is read as such; anything else is a folder or file of objects."""
    if arg == "-":
        return from_document(_parse(stdin.read(), "stdin"), "stdin")
    path = Path(arg)
    if path.is_file():
        try:
            text = path.read_text()
        except OSError as e:
            raise PolicyLoadError(f"{arg}: cannot read: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise PolicyLoadError(f"{arg}: not UTF-8 text") from None
        data = _parse(text, arg)
        if isinstance(data, dict) and data.get("kind") in COMPILED_KINDS:
            return from_document(data, arg)
    return PolicyInput(CrFolder(path, namespace, platform).load().policy, f"{arg} (objects)")


def _parse(text: str, where: str) -> object:
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise PolicyLoadError(f"{where}: not YAML or JSON: {e}") from None
    except RecursionError:
        raise PolicyLoadError(f"{where}: nested too deeply to be a Policy") from None
    return docs[0] if docs else None
