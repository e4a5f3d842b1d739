"""The operator on a real control plane (API server, controller-manager, scheduler, kwok): tiers
become Running Deployments, Services, PDBs and a Policy ConfigMap; drift is put back; deletion is
garbage-collected; an idle operator writes nothing; a killed operator converges on restart."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from localcluster import Cluster
from tests import cases
from tests.conftest import ROOT, wait_for
from tests.operatorproc import OperatorProcess

pytestmark = pytest.mark.cluster
WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection"}


@pytest.fixture(scope="module")
def operator(crds: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    op = OperatorProcess(crds, tmp_path_factory.mktemp("operator")).start()
    try:
        yield op
    finally:
        op.stop()


def get(cluster: Cluster, *args: str) -> Any:
    out = cluster.kubectl("get", *args, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    for c in ((obj or {}).get("status") or {}).get("conditions", []):
        if c["type"] == type_:
            return dict(c)
    return {}


def ready(cluster: Cluster, ns: str, name: str) -> bool:
    t = get(cluster, "inferencetier", name, "-n", ns)
    c = condition(t, "Ready")
    return c.get("status") == "True" and c.get("observedGeneration") == t["metadata"]["generation"]


def apply(cluster: Cluster, ns: str, *docs: dict[str, Any], path: Path | None = None) -> None:
    args = ["apply", "--server-side", "--field-manager=tests", "-n", ns]
    if path is not None:
        cluster.kubectl(*args, "-f", str(path))
        return
    cluster.kubectl(*args, "-f", "-", input=yaml.safe_dump_all(docs))


def self_hosted_tier(name: str, image: str = "vllm/vllm-openai:v0.11.0", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "tierwise.dev/v1alpha1",
        "kind": "InferenceTier",
        "metadata": {"name": name},
        "spec": {
            "backends": [
                {
                    "name": "llama",
                    "model": "llama-3.1-8b",
                    "pricing": {"inputPerMillion": 0.05, "outputPerMillion": 0.15},
                    "deployment": {"image": image, "port": 8000, "replicas": {"min": 1, "max": 3}},
                }
            ],
            **spec,
        },
    }


def audit_writes(cluster: Cluster, since: float) -> list[str]:
    """Write requests the operator sent after `since`, from the API server's audit log."""
    assert cluster.workdir is not None
    out = []
    for line in (cluster.workdir / "audit.log").read_text().splitlines():
        e = json.loads(line)
        if e.get("stage") != "ResponseComplete" or e.get("verb") not in WRITE_VERBS:
            continue
        agent = e.get("userAgent", "")
        if not (agent.startswith("tierwise-operator") or agent.startswith("kopf")):
            continue
        stamp = e["requestReceivedTimestamp"]
        when = time.mktime(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
        if when >= since:
            out.append(f"{e['verb']} {e['requestURI']}")
    return out


def test_quickstart_becomes_running_deployments_services_and_a_policy(
    operator: OperatorProcess, namespace: str
) -> None:
    c = operator.cluster
    c.kubectl("label", "namespace", namespace, "tierwise.dev/injection=enabled")
    apply(c, namespace, path=ROOT / "examples" / "quickstart" / "1-tiers.yaml")
    for t in ("gold", "silver", "bronze"):
        wait_for(f"tier {t} Ready", lambda t=t: ready(c, namespace, t), timeout=90)

    pods = get(c, "pods", "-n", namespace, "-l", "tierwise.dev/tier=silver,tierwise.dev/backend=llama-8b")["items"]
    assert [p["status"]["phase"] for p in pods] == ["Running"]
    assert pods[0]["spec"]["containers"][0]["image"] == "vllm/vllm-openai:v0.11.0"
    dep = get(c, "deployment", "silver-llama-8b", "-n", namespace)
    assert dep["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "tierwise-operator"
    assert dep["metadata"]["annotations"]["tierwise.dev/model"] == "meta-llama/Llama-3.1-8B-Instruct"
    owner = dep["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("InferenceTier", "silver", True)
    svc = get(c, "service", "silver-llama-8b", "-n", namespace)
    assert svc["spec"]["ports"][0]["port"] == 8000 and svc["spec"]["clusterIP"] != "None"
    assert get(c, "service", "silver-llama-8b-hl", "-n", namespace)["spec"]["clusterIP"] == "None"
    assert get(c, "pdb", "silver-llama-8b", "-n", namespace)["spec"]["maxUnavailable"] == 1
    # External backends own nothing.
    assert get(c, "deployment", "-n", namespace, "-l", "tierwise.dev/tier=gold")["items"] == []

    cm = wait_for("the Policy ConfigMap", lambda: get(c, "configmap", "tierwise-policy", "-n", namespace))
    policy = json.loads(cm["data"]["policy.json"])
    assert policy["namespace"] == namespace and sorted(policy["tiers"]) == ["bronze", "gold", "silver"]
    assert policy["defaultTier"] == "bronze"
    assert cm["metadata"]["annotations"]["tierwise.dev/policy-hash"] == policy["hash"]
    # The same files compiled locally (a GitOps check) give the same Policy, byte for byte: what the
    # cluster adds (generations, uids) is not part of it.
    docs = [d for d in yaml.safe_load_all((ROOT / "examples" / "quickstart" / "1-tiers.yaml").read_text()) if d]
    for d in docs:
        d["metadata"]["namespace"] = namespace
    # The platform's tiers are part of every namespace's Policy (as the ones it is not granted):
    # in Git they are the platform team's files; here, what the cluster holds.
    docs += get(c, "inferencetiers", "-n", "tierwise-system")["items"]
    local = subprocess.run(
        [sys.executable, "-m", "tierwise_cli", "compile", "-", "-n", namespace, "-o", "json"],
        input=yaml.safe_dump_all(docs), capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert json.dumps(json.loads(local.stdout), sort_keys=True, separators=(",", ":")) == cm["data"]["policy.json"]

    header, *lines = c.kubectl("get", "inferencetiers", "-n", namespace).stdout.splitlines()
    col = header.index("READY")  # columns are aligned; an empty FALLBACK cell shifts split() fields
    assert {line.split()[0]: line[col:].split()[0] for line in lines} == {
        "bronze": "True",
        "gold": "True",
        "silver": "True",
    }
    silver = get(c, "inferencetier", "silver", "-n", namespace)["status"]
    assert silver["readyBackends"] == 2 and silver["replicas"] == 1
    assert silver["routingWeights"] == {"llama-8b": 1, "openai-4o-mini": 1}
    events = c.kubectl("get", "events", "-n", namespace, "--field-selector", "involvedObject.name=silver").stdout
    assert "created Deployment silver-llama-8b" in events


def test_spec_change_hand_edit_hand_delete_and_tier_delete(operator: OperatorProcess, namespace: str) -> None:
    c = operator.cluster
    apply(c, namespace, self_hosted_tier("chat"))
    wait_for("chat Ready", lambda: ready(c, namespace, "chat"), timeout=90)

    def image() -> str:
        return str(
            get(c, "deployment", "chat-llama", "-n", namespace)["spec"]["template"]["spec"]["containers"][0]["image"]
        )

    apply(c, namespace, self_hosted_tier("chat", image="vllm/vllm-openai:v0.12.0"))
    wait_for("the spec change applied", lambda: image() == "vllm/vllm-openai:v0.12.0")

    c.kubectl("set", "image", "deployment/chat-llama", "model-server=evil/image:1", "-n", namespace)
    wait_for("the hand edit reverted", lambda: image() == "vllm/vllm-openai:v0.12.0")

    c.kubectl("patch", "service", "chat-llama", "-n", namespace, "--type=merge", "-p",
              '{"spec":{"ports":[{"name":"http","port":9999,"targetPort":"model"}]}}')  # fmt: skip
    wait_for(
        "the Service port put back",
        lambda: get(c, "service", "chat-llama", "-n", namespace)["spec"]["ports"][0]["port"] == 8000,
    )

    uid = get(c, "service", "chat-llama-hl", "-n", namespace)["metadata"]["uid"]
    c.kubectl("delete", "service", "chat-llama-hl", "-n", namespace)
    c.kubectl("delete", "pdb", "chat-llama", "-n", namespace)
    wait_for(
        "the headless Service recreated",
        lambda: (
            (get(c, "service", "chat-llama-hl", "-n", namespace) or {}).get("metadata", {}).get("uid")
            not in (None, uid)
        ),
    )
    wait_for("the PDB recreated", lambda: get(c, "pdb", "chat-llama", "-n", namespace))

    c.kubectl("delete", "inferencetier", "chat", "-n", namespace)
    for kind in ("deployment", "service", "pdb"):
        wait_for(
            f"{kind}s garbage-collected",
            lambda kind=kind: get(c, kind, "-n", namespace, "-l", "tierwise.dev/tier=chat")["items"] == [],
            timeout=60,
        )
    assert get(c, "pods", "-n", namespace, "-l", "tierwise.dev/tier=chat")["items"] == [] or wait_for(
        "pods gone", lambda: get(c, "pods", "-n", namespace, "-l", "tierwise.dev/tier=chat")["items"] == []
    )


def test_invalid_cross_reference_is_a_condition_and_holds_the_last_good_policy(
    operator: OperatorProcess, namespace: str
) -> None:
    c = operator.cluster
    c.kubectl("label", "namespace", namespace, "tierwise.dev/injection=enabled")
    ext = {
        "name": "api",
        "model": "gpt-4o-mini",
        "url": "https://api.openai.com/v1",
        "pricing": {"inputPerMillion": 0.15, "outputPerMillion": 0.6},
    }
    tier = {"apiVersion": "tierwise.dev/v1alpha1", "kind": "InferenceTier", "metadata": {"name": "front"}}
    apply(c, namespace, {**tier, "spec": {"backends": [ext]}})
    wait_for("front Ready", lambda: ready(c, namespace, "front"))
    good = wait_for("a Policy", lambda: get(c, "configmap", "tierwise-policy", "-n", namespace))

    apply(c, namespace, {**tier, "spec": {"backends": [ext], "fallback": {"tier": "platinum"}}})

    def broken() -> dict[str, Any]:
        t = get(c, "inferencetier", "front", "-n", namespace)
        cond = condition(t, "Ready")
        return cond if cond.get("status") == "False" and cond["observedGeneration"] == 2 else {}

    cond = wait_for("the invalid reference reported", broken)
    assert cond["reason"] == "InvalidSpec"
    assert "spec.fallback.tier" in cond["message"] and "platinum" in cond["message"]
    events = c.kubectl("get", "events", "-n", namespace, "--field-selector", "involvedObject.name=front").stdout
    assert "platinum" in events
    # The namespace keeps its last good Policy rather than half of a broken one.
    time.sleep(2)
    assert get(c, "configmap", "tierwise-policy", "-n", namespace)["data"] == good["data"]

    apply(c, namespace, {**tier, "spec": {"backends": [ext]}})
    wait_for("front Ready again", lambda: ready(c, namespace, "front"))


def test_budgets_and_cache_policies_say_in_ready_whether_they_compile(
    operator: OperatorProcess, namespace: str
) -> None:
    """With the validating webhook down (failurePolicy Ignore) contradicting budgets and references
    to missing tiers are admitted: their Ready condition is where a GitOps user sees them."""
    c = operator.cluster

    def ready_of(kind: str, name: str) -> dict[str, Any]:
        obj = get(c, kind, name, "-n", namespace)
        cond = condition(obj, "Ready")
        return cond if cond and cond.get("observedGeneration") == obj["metadata"]["generation"] else {}

    def turns(kind: str, name: str, status: str) -> dict[str, Any]:
        return wait_for(
            f"{kind} {name} Ready={status}", lambda: (r := ready_of(kind, name)).get("status") == status and r
        )

    apply(c, namespace, cases.budget("team", limit={"usd": 100}), cases.cache("answers", selector={"tiers": ["fast"]}))
    assert turns("costbudget", "team", "True")["reason"] == "Valid"
    missing = turns("cachepolicy", "answers", "False")
    assert missing["reason"] == "InvalidSpec"
    assert 'spec.selector.tiers[0]: tier "fast" does not exist' in missing["message"], missing

    # The tier arrives: the cache policy compiles now, without being touched itself.
    apply(c, namespace, cases.tier("fast"))
    assert turns("cachepolicy", "answers", "True")["reason"] == "Valid"

    # A second budget over the same traffic with another limit contradicts the first.
    apply(c, namespace, cases.budget("team-too", limit={"usd": 10}))
    clash = turns("costbudget", "team-too", "False")
    assert "spec.selector" in clash["message"] and f"CostBudget {namespace}/team" in clash["message"], clash
    events = c.kubectl("get", "events", "-n", namespace, "--field-selector", "involvedObject.name=team-too").stdout
    assert "InvalidSpec" in events
    # Made a dry run, it no longer enforces anything, so nothing contradicts.
    apply(c, namespace, cases.budget("team-too", limit={"usd": 10}, dryRun=True))
    turns("costbudget", "team-too", "True")
    assert c.kubectl("get", "costbudgets", "-n", namespace).stdout.count("True") == 2


def test_an_idle_operator_makes_no_writes(operator: OperatorProcess, namespace: str) -> None:
    c = operator.cluster
    c.kubectl("label", "namespace", namespace, "tierwise.dev/injection=enabled")
    apply(c, namespace, self_hosted_tier("idle"))
    wait_for("idle Ready", lambda: ready(c, namespace, "idle"), timeout=90)
    # Idle means the whole cluster: earlier tests' namespaces must be gone, not still terminating.
    wait_for(
        "no namespace terminating",
        lambda: all(n["status"]["phase"] != "Terminating" for n in get(c, "namespaces")["items"]),
        timeout=180,
    )
    wait_for("the operator idle", operator.idle)
    time.sleep(2)
    since, before = time.time(), operator.writes()
    time.sleep(60)
    if c.workdir is not None:  # our own control plane keeps an audit log
        assert audit_writes(c, since) == []
    assert operator.writes() == before


def test_killed_mid_reconcile_converges_on_restart_without_duplicates(
    operator: OperatorProcess, namespace: str
) -> None:
    crds = operator.cluster
    names = [f"t{i}" for i in range(8)]
    apply(crds, namespace, *[self_hosted_tier(n) for n in names])
    wait_for(
        "the first Deployment",
        lambda: get(crds, "deployment", "-n", namespace)["items"],
        interval=0.05,
    )
    operator.kill()  # SIGKILL mid-reconcile: some tiers have children, some do not
    operator.start()
    for n in names:
        wait_for(f"{n} Ready", lambda n=n: ready(crds, namespace, n), timeout=120)
    deps = get(crds, "deployment", "-n", namespace)["items"]
    assert sorted(d["metadata"]["name"] for d in deps) == sorted(f"{n}-llama" for n in names)
    for d in deps:
        assert len(d["metadata"]["ownerReferences"]) == 1
    for kind, per_tier in (("service", 2), ("pdb", 1)):
        assert len(get(crds, kind, "-n", namespace)["items"]) == per_tier * len(names)
    replicasets = get(crds, "replicasets", "-n", namespace)["items"]
    assert len(replicasets) == len(names)  # one rollout each: the restart changed no pod template


KEDA_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "scaledobjects.keda.sh"},
    "spec": {
        "group": "keda.sh",
        "scope": "Namespaced",
        "names": {"kind": "ScaledObject", "plural": "scaledobjects", "singular": "scaledobject"},
        "versions": [
            {
                "name": "v1alpha1",
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
            }
        ],
    },
}


def test_hpa_mode_leaves_replicas_to_the_hpa_and_keda_needs_its_crd(operator: OperatorProcess, namespace: str) -> None:
    c = operator.cluster
    apply(c, namespace, self_hosted_tier("auto", autoscaling={"mode": "HPA", "target": 4}))
    hpa = wait_for("the HPA", lambda: get(c, "hpa", "auto-llama", "-n", namespace), timeout=60)
    assert hpa["spec"]["scaleTargetRef"]["name"] == "auto-llama" and hpa["spec"]["maxReplicas"] == 3
    dep = wait_for(
        "the Deployment", lambda: get(c, "deployment", "auto-llama", "-n", namespace, "--show-managed-fields")
    )
    ours = [m for m in dep["metadata"]["managedFields"] if m["manager"] == "tierwise-operator"]
    assert ours and all("f:replicas" not in json.dumps(m.get("fieldsV1", {}).get("f:spec", {})) for m in ours)

    # Back to the built-in autoscaler: the HPA goes, the operator owns replicas again.
    apply(c, namespace, self_hosted_tier("auto", autoscaling={"mode": "Builtin"}))
    wait_for("the HPA removed", lambda: get(c, "hpa", "auto-llama", "-n", namespace) is None)

    # KEDA without its CRD (and without a Prometheus for its trigger) is a spec error, reported once.
    apply(c, namespace, self_hosted_tier("auto", autoscaling={"mode": "KEDA"}))

    def refused() -> dict[str, Any]:
        cond = condition(get(c, "inferencetier", "auto", "-n", namespace), "Ready")
        return cond if cond.get("observedGeneration") == 3 and cond.get("status") == "False" else {}

    assert "KEDA" in wait_for("KEDA refused", refused)["message"]
    c.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(KEDA_CRD))
    try:
        c.kubectl("wait", "--for=condition=Established", "crd/scaledobjects.keda.sh", "--timeout=60s")
        c.kubectl("annotate", "inferencetier", "auto", "-n", namespace, "touch=1")  # any event: re-check
        wait_for("the missing Prometheus reported", lambda: "--prometheus-url" in refused().get("message", ""))
    finally:
        c.kubectl("delete", "crd", "scaledobjects.keda.sh", "--wait=false", check=False)
