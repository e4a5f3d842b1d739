"""What the validating webhook decides (pure): the cross-object problems a change would add.

CEL in the CRDs judges one object; only the whole set can show a fallback cycle, a reference to a
tier that does not exist, or two budgets that contradict each other. The judge is the compiler's
own `check`, the same one the operator and `tierwise compile` run, on the cluster's objects with
the incoming one in place of its old version. Only problems the change *adds* refuse it: an object
already broken by someone else's change (or applied while the webhook was down) never blocks
unrelated edits, nor a partial fix.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from tierwise.api.resources import AnyResource, Namespace, Problem, parse_object
from tierwise.compiler import build_world, check

Obj = dict[str, Any]


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    message: str = ""
    # Problems the object already had before this change: kubectl prints them as warnings.
    warnings: tuple[str, ...] = ()


def _key(kind: object, meta: Obj) -> tuple[str, str, str]:
    return str(kind), str(meta.get("namespace") or ""), str(meta.get("name") or "")


def _problems(resources: Sequence[AnyResource], namespaces: Sequence[Namespace], platform: str) -> set[Problem]:
    return set(check(build_world(resources, namespaces, platform), resources))


def _parsed(objs: Iterable[Obj]) -> list[AnyResource]:
    out = []
    for o in objs:
        r = parse_object(o)
        if r is not None and not isinstance(r, Problem):
            out.append(r)
    return out


def judge(
    cluster: Sequence[Obj],
    namespaces: Sequence[Namespace],
    incoming: Obj,
    platform: str,
    tolerate_dangling: bool = False,
) -> Verdict:
    """May `incoming` (created or updated) join `cluster`, the tierwise objects stored now?

    With `tolerate_dangling`, a reference to a tier that does not exist yet is a warning, not a
    refusal: for GitOps tools that apply a set in an order of their own.
    """
    parsed = parse_object(incoming)
    if isinstance(parsed, Problem):
        return Verdict(False, str(parsed))
    if parsed is None:
        return Verdict(True)
    key = _key(incoming.get("kind"), incoming.get("metadata") or {})
    others = [o for o in cluster if _key(o.get("kind"), o.get("metadata") or {}) != key]
    before = _problems(_parsed(cluster), namespaces, platform)
    after = _problems([*_parsed(others), parsed], namespaces, platform)
    # A problem is the same problem while its identity (object, field, sort) holds, even when its
    # message changes (a cycle through other tiers, one default tier fewer): a partial fix passes.
    had = {p.identity for p in before}
    added = sorted((p for p in after if p.identity not in had), key=str)
    kept = sorted((p for p in after if p.identity in had and p.obj == parsed.ref), key=str)
    if tolerate_dangling:
        kept = sorted([*kept, *(p for p in added if p.dangling)], key=str)
        added = [p for p in added if not p.dangling]
    if added:
        return Verdict(False, "; ".join(str(p) for p in added), tuple(str(p) for p in kept))
    return Verdict(True, warnings=tuple(str(p) for p in kept))
