"""A compiled Policy in a few lines (what the demo prints instead of cutting the YAML off)."""

from __future__ import annotations

import sys
from typing import Any

import yaml


def summary(policy: dict[str, Any]) -> list[str]:
    lines = [f"namespace {policy['namespace']}, default tier {policy.get('defaultTier')}, hash {policy['hash']}"]
    for name, tier in policy["tiers"].items():
        spec = tier["spec"]
        backends = ", ".join(b["name"] for b in spec["backends"])
        chain = " -> ".join(tier.get("fallbackChain") or []) or "none"
        lines.append(f"  tier {name}: priority {spec.get('priority', 0)}, backends {backends}; fallback {chain}")
    lines += [f"  budget {b['namespace']}/{b['name']}" for b in policy.get("budgets") or []]
    lines += [f"  cache policy {c['namespace']}/{c['name']}" for c in policy.get("cachePolicies") or []]
    return lines


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print("\n".join(summary(yaml.safe_load(f))))
