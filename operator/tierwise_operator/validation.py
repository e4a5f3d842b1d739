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


def standing(resources: Sequence[AnyResource], namespaces: Sequence[Namespace], platform: str) -> frozenset[Problem]:
    """The problems the stored objects have now (what a change is compared with)."""
    return frozenset(check(build_world(resources, namespaces, platform), resources))


def parsed_objects(objs: Iterable[Obj]) -> list[AnyResource]:
    """The objects that parse; one that does not was stored before its CRD's rules and judges nothing."""
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
    """May `incoming` (created or updated) join `cluster`, the tierwise objects stored now?"""
    return judge_against(parsed_objects(cluster), namespaces, incoming, platform, tolerate_dangling=tolerate_dangling)


def judge_against(
    stored: Sequence[AnyResource],
    namespaces: Sequence[Namespace],
    incoming: Obj,
    platform: str,
    *,
    tolerate_dangling: bool = False,
    before: frozenset[Problem] | None = None,
) -> Verdict:
    """`judge` on parsed objects, with their `standing` problems when the caller has them already.

    With `tolerate_dangling`, a reference to a tier that does not exist yet is a warning, not a
    refusal: for GitOps tools that apply a set in an order of their own.
    """
    parsed = parse_object(incoming)
    if isinstance(parsed, Problem):
        return Verdict(False, str(parsed))
    if parsed is None:
        return Verdict(True)
    if before is None:
        before = standing(stored, namespaces, platform)
    after = standing([*(r for r in stored if r.ref != parsed.ref), parsed], namespaces, platform)
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
