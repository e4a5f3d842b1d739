"""How the informer applies a watch stream to its store, without a cluster."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tierwise_operator.informer import Informer, _RelistError
from tierwise_operator.kube import TIER, ApiError
from tierwise_operator.store import Store

Obj = dict[str, Any]


def tier(name: str, rv: str, priority: int = 1) -> Obj:
    return {
        "apiVersion": "tierwise.dev/v1alpha1",
        "kind": "InferenceTier",
        "metadata": {"name": name, "namespace": "a", "resourceVersion": rv, "managedFields": [{"manager": "x"}]},
        "spec": {"priority": priority},
        "status": {"replicas": 1},
    }


async def stream(*events: Obj) -> AsyncIterator[Obj]:
    for e in events:
        yield e


def apply(informer: Informer, *events: Obj) -> str:
    return asyncio.run(informer._apply(TIER, "10", stream(*events)))


def test_events_update_the_store_and_the_version_to_resume_from() -> None:
    store = Store()
    informer = Informer(None, store, [TIER])  # type: ignore[arg-type]
    last = apply(
        informer,
        {"type": "ADDED", "object": tier("gold", "11")},
        {"type": "MODIFIED", "object": tier("gold", "12", priority=5)},
        {"type": "ADDED", "object": tier("silver", "13")},
        {"type": "DELETED", "object": tier("silver", "14")},
        # A bookmark carries only a resourceVersion: resume after it, change nothing.
        {"type": "BOOKMARK", "object": {"kind": "InferenceTier", "metadata": {"resourceVersion": "20"}}},
    )
    assert last == "20"
    gold = store.get("InferenceTier", "a", "gold")
    assert gold is not None and gold["spec"] == {"priority": 5}
    assert "managedFields" not in gold["metadata"] and "status" not in gold
    assert store.get("InferenceTier", "a", "silver") is None
    assert [o["metadata"]["name"] for o in store.all("InferenceTier")] == ["gold"]


def test_an_expired_version_relists_and_other_errors_are_errors() -> None:
    informer = Informer(None, Store(), [TIER])  # type: ignore[arg-type]
    gone = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old resource version"}}
    with pytest.raises(_RelistError):
        apply(informer, gone)
    denied = {"type": "ERROR", "object": {"kind": "Status", "code": 403, "reason": "Forbidden", "message": "no"}}
    with pytest.raises(ApiError) as e:
        apply(informer, denied)
    assert e.value.status == 403


def test_a_lean_store_keeps_the_parsed_form_and_sees_spec_changes_by_generation() -> None:
    store = Store(lean=True)
    gold = {
        **tier("gold", "11"),
        "spec": {
            "backends": [
                {
                    "name": "b",
                    "model": "m",
                    "url": "http://x/v1",
                    "pricing": {"inputPerMillion": 1, "outputPerMillion": 1},
                }
            ]
        },
    }
    gold["metadata"]["generation"] = 1
    assert store.put("InferenceTier", gold)
    kept = store.get("InferenceTier", "a", "gold")
    assert kept is not None and "spec" not in kept and kept["metadata"]["resourceVersion"] == "11"
    (parsed,), problems = store.resources()
    assert problems == [] and parsed.name == "gold" and parsed.spec.backends[0].model == "m"
    version = store.version
    # A status write: a new resourceVersion, the same generation: nothing a Policy depends on.
    assert store.put("InferenceTier", {**gold, "metadata": {**gold["metadata"], "resourceVersion": "12"}})
    assert store.version == version
    # A spec change bumps the generation: seen, and parsed anew.
    changed = {**gold, "metadata": {**gold["metadata"], "resourceVersion": "13", "generation": 2}}
    changed["spec"] = {**gold["spec"], "priority": 7}
    assert store.put("InferenceTier", changed)
    assert store.version > version
    assert store.resources()[0][0].spec.priority == 7
