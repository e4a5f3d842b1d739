"""The webhook's informer against the real API server: it follows creates, updates and deletes,
resumes when the server ends a watch, and relists what changed while its watch was down; the view
the webhook judges on does not miss an edit the watch has not delivered yet."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from localcluster import Cluster
from tests import cases
from tests.accounts import token_kubeconfig
from tierwise_operator.clusterview import ClusterView
from tierwise_operator.informer import Informer
from tierwise_operator.kube import NAMESPACE, TIER, Kube
from tierwise_operator.store import Store
from tierwise_operator.validation import judge_against

pytestmark = pytest.mark.cluster


async def until(what: str, probe: Any, timeout: float = 30) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not probe():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def test_the_cache_follows_the_api_server_across_watch_ends_and_breaks(
    crds: Cluster, namespace: str, tmp_path: Path
) -> None:
    cluster = crds
    account, role = "informer", f"tierwise-informer-{namespace}"
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": role},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
    }
    cluster.kubectl("create", "serviceaccount", account, "-n", namespace)
    cluster.kubectl(
        "create", "clusterrole", role, "--verb=list,watch", "--resource=inferencetiers.tierwise.dev,namespaces"
    )  # fmt: skip
    cluster.kubectl("apply", "-f", "-", input=json.dumps(binding))
    kubeconfig = token_kubeconfig(cluster, namespace, account, tmp_path / "informer.kubeconfig")

    def kubectl(*args: str, doc: dict[str, Any] | None = None) -> None:
        cluster.kubectl(*args, "-n", namespace, input=json.dumps(doc) if doc else None)

    def spec_of(store: Store, name: str) -> dict[str, Any] | None:
        obj = store.get("InferenceTier", namespace, name)
        return None if obj is None else obj["spec"]

    async def scenario() -> None:
        kube = await Kube.connect(str(kubeconfig))
        store = Store()
        # Watches the server ends every 2 s: the cache must resume from where each ended.
        informer = Informer(kube, store, [TIER, NAMESPACE], max_backoff=1, watch_seconds=2)
        task = asyncio.create_task(informer.run())
        try:
            kubectl("apply", "-f", "-", doc=cases.tier("before"))
            await until("the informer current", lambda: informer.current)
            await until("a listed tier", lambda: spec_of(store, "before") is not None)
            stored = store.get("InferenceTier", namespace, "before")
            assert stored is not None and "managedFields" not in stored["metadata"] and "status" not in stored
            assert store.get("Namespace", "", namespace) is not None

            await asyncio.to_thread(kubectl, "apply", "-f", "-", doc=cases.tier("after", priority=3))
            await until("a created tier", lambda: (spec_of(store, "after") or {}).get("priority") == 3)
            await asyncio.sleep(3)  # at least one watch ended by the server meanwhile
            await asyncio.to_thread(kubectl, "apply", "-f", "-", doc=cases.tier("after", priority=4))
            await until("an updated tier", lambda: (spec_of(store, "after") or {}).get("priority") == 4)
            await asyncio.to_thread(kubectl, "delete", "inferencetier", "before")
            await until("a deleted tier", lambda: spec_of(store, "before") is None)

            # Its permission taken away: the next watch is refused, the cache is not current (the
            # webhook lists instead), and what changed meanwhile is there once it may read again.
            await asyncio.to_thread(cluster.kubectl, "delete", "clusterrolebinding", role)
            await until("the break noticed", lambda: not informer.current, timeout=10)
            await asyncio.to_thread(kubectl, "delete", "inferencetier", "after")
            await asyncio.to_thread(kubectl, "apply", "-f", "-", doc=cases.tier("meanwhile"))
            assert not informer.current
            await asyncio.to_thread(cluster.kubectl, "apply", "-f", "-", input=json.dumps(binding))
            await until("relisted", lambda: informer.current and spec_of(store, "meanwhile") is not None)
            assert spec_of(store, "after") is None
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await kube.close()

    try:
        asyncio.run(scenario())
    finally:
        cluster.kubectl("delete", "clusterrolebinding,clusterrole", role, "--ignore-not-found", check=False)


def test_a_cycle_closed_through_an_edit_the_cache_has_not_seen_is_refused(crds: Cluster, namespace: str) -> None:
    """The webhook's view lays what can make a problem with the object, read fresh, over its cache:
    an edit the watch has not delivered yet (here: the watch stopped after syncing) still counts."""
    cluster = crds

    def apply(doc: dict[str, Any]) -> None:
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(doc))

    for doc in (cases.tier("a", fallback={"tier": "b"}), cases.tier("b"), cases.tier("c")):
        apply(doc)

    async def scenario() -> None:
        kube = await Kube.connect(str(cluster.kubeconfig))
        view = ClusterView(kube, "tierwise-system")
        task = asyncio.create_task(view.run())
        try:
            await until("the cache current", lambda: view.informer.current)
            await until("c cached", lambda: view.store.get("InferenceTier", namespace, "c") is not None)
            task.cancel()  # the cache stops here, still marked current: a watch event that is late
            await asyncio.gather(task, return_exceptions=True)
            assert (await view.for_object("InferenceTier", namespace)).source == "cache"

            await asyncio.to_thread(apply, cases.tier("b", fallback={"tier": "c"}))
            closing = cases.tier("c", fallback={"tier": "a"})
            closing["metadata"]["namespace"] = namespace
            snap = await view.for_object("InferenceTier", namespace)
            assert snap.source == "merged"
            verdict = judge_against(snap.resources, snap.namespaces, closing, view.platform, before=snap.problems)
            assert not verdict.allowed and "fallback cycle: a -> b -> c -> a" in verdict.message, verdict
            # Judged on the cache alone, it would have passed: what this view exists for.
            stale = view._cached()
            assert stale is not None
            assert judge_against(stale.resources, stale.namespaces, closing, view.platform).allowed

            # The same for a budget contradicting one the watch has not delivered.
            await asyncio.to_thread(apply, cases.budget("team", limit={"usd": 100}))
            rival = cases.budget("team-too", limit={"usd": 10})
            rival["metadata"]["namespace"] = namespace
            snap = await view.for_object("CostBudget", namespace)
            verdict = judge_against(snap.resources, snap.namespaces, rival, view.platform, before=snap.problems)
            assert snap.source == "merged" and not verdict.allowed and "spec.selector" in verdict.message, verdict
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await kube.close()

    asyncio.run(scenario())
